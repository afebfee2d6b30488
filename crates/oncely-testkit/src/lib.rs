//! The store conformance suite every Oncely store runs, and test helpers.
