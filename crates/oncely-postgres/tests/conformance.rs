//! The PostgreSQL store passes the store conformance suite: each case on a table of its
//! own in a database of this test process, on the real server the testkit starts (or the
//! one `ONCELY_TEST_POSTGRES_URL` names).

mod common;

oncely_testkit::store_conformance!(common::fresh_store());
