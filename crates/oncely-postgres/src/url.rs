//! The PostgreSQL store's URL, `postgres://…[?options]`, parsed into the driver's
//! connection URL and [`PostgresOptions`]; and the store's abilities.

use std::fmt;
use std::str::FromStr;

use oncely::StoreError;
use oncely::store::StoreAbilities;
use oncely::store::url::{self, UrlError, redacted};
use sqlx_postgres::PgConnectOptions;

use crate::sql::TableName;
use crate::{PostgresOptions, PostgresStore};

/// A parsed `postgres://` (or `postgresql://`) URL: the connection the driver makes and
/// the store's options.
///
/// `postgres://USER:PASSWORD@HOST:PORT/DATABASE[?options]`. The store's options, with
/// [`PostgresOptions`]' defaults when absent:
///
/// - `table=NAME`: the table records live in (default `oncely_records`);
/// - `pool=N`: the most connections (default 16);
/// - `acquire_timeout=DURATION`, `statement_timeout=DURATION`, `sweep_interval=DURATION`
///   (defaults 5 s, 5 s, 60 s).
///
/// Every other query parameter (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`,
/// `application_name`, …) stays in the URL for the driver, which checks it here already:
/// SQLx's `PgConnectOptions` parses the rest. The TLS parameters are libpq's; see the
/// [crate docs](crate#tls) for what each `sslmode` checks and the default (`prefer`,
/// which may fall back to plain text: use `verify-full`). `sslcert` without `sslkey` (or
/// the other way round) is refused here. [`Display`](fmt::Display) and [`Debug`] show the
/// URL with its password as `***`.
///
/// ```no_run
/// use oncely_postgres::PostgresUrl;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = "postgres://app@db.internal/app?pool=8&sslmode=verify-full".parse::<PostgresUrl>()?.open().await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresUrl {
    connection: String,
    options: PostgresOptions,
}

impl PostgresUrl {
    /// The URL the driver connects to: the store's options taken out, the driver's kept.
    /// It holds the password, if one was given: show [`redacted`] instead.
    pub fn connection_url(&self) -> &str {
        &self.connection
    }

    /// The options the URL set.
    pub fn options(&self) -> &PostgresOptions {
        &self.options
    }

    /// The connection URL and the options, for [`PostgresStore::connect`].
    pub fn into_parts(self) -> (String, PostgresOptions) {
        (self.connection, self.options)
    }

    /// Connects ([`PostgresStore::connect`]).
    ///
    /// # Errors
    /// As [`PostgresStore::connect`].
    pub async fn open(self) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect(&self.connection, self.options).await
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redacted(&self.connection))
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresUrl")
            .field("connection", &redacted(&self.connection))
            .field("options", &self.options)
            .finish()
    }
}

impl FromStr for PostgresUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let (base, pairs) = url::split_options(text);
        if !(base.starts_with("postgres://") || base.starts_with("postgresql://")) {
            return Err(UrlError::Scheme { expected: "postgres:// or postgresql://" });
        }
        let mut options = PostgresOptions::default();
        let mut driver = Vec::new();
        for (name, value) in pairs {
            options = match name {
                "table" => {
                    TableName::new(value).map_err(|e| UrlError::invalid("table", e.to_string()))?;
                    options.table(value)
                }
                "pool" => options.max_connections(url::count("pool", value)?),
                "acquire_timeout" => options.acquire_timeout(url::duration("acquire_timeout", value)?),
                "statement_timeout" => options.statement_timeout(Some(url::duration("statement_timeout", value)?)),
                "sweep_interval" => options.sweep_interval(url::duration("sweep_interval", value)?),
                _ => {
                    driver.push(format!("{name}={value}"));
                    options
                }
            };
        }
        let given = |names: [&str; 2]| driver.iter().any(|p| names.iter().any(|n| p.starts_with(&format!("{n}="))));
        match (given(["sslcert", "ssl-cert"]), given(["sslkey", "ssl-key"])) {
            (true, false) => return Err(UrlError::invalid("sslcert", CERT_AND_KEY)),
            (false, true) => return Err(UrlError::invalid("sslkey", CERT_AND_KEY)),
            _ => {}
        }
        let connection = if driver.is_empty() { base.to_string() } else { format!("{base}?{}", driver.join("&")) };
        // The driver's own errors name the parameter, not the password.
        PgConnectOptions::from_str(&connection).map_err(|e| UrlError::Malformed(e.to_string()))?;
        Ok(PostgresUrl { connection, options })
    }
}

/// Why a client certificate without its key (or the other way round) is refused: the
/// driver would refuse it only when it connects.
const CERT_AND_KEY: &str =
    "sslcert and sslkey go together (the client certificate and its key, for mutual TLS): give both or neither";

impl PostgresStore {
    /// What this store can do: count and list its records with one statement each (a
    /// count reads the table's live rows on the server); shared by every process on the
    /// table; durable as the server's commits are.
    pub fn abilities(&self) -> StoreAbilities {
        StoreAbilities::NONE
            .counts_records_cheaply(true)
            .lists_records(true)
            .shared_between_processes(true)
            .durable(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PostgresUrl, UrlError> {
        text.parse()
    }

    #[test]
    fn store_options_are_taken_out_and_driver_parameters_kept() {
        let url = parse("postgres://app:s3cret@db:5432/app?sslmode=disable&table=Payments&pool=4&acquire_timeout=2s&statement_timeout=1s&sweep_interval=30s&application_name=x")
            .expect("parses");
        assert_eq!(url.connection_url(), "postgres://app:s3cret@db:5432/app?sslmode=disable&application_name=x");
        assert_eq!(url.to_string(), "postgres://app:***@db:5432/app?sslmode=disable&application_name=x");
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        for set in [
            "table: \"Payments\"",
            "max_connections: 4",
            "acquire_timeout: 2s",
            "statement_timeout: Some(1s)",
            "sweep_interval: Some(30s)",
        ] {
            assert!(shown.contains(set), "{set} in {shown}");
        }
        let plain = parse("postgresql://db/app").expect("parses");
        assert_eq!(plain.connection_url(), "postgresql://db/app");
        assert!(format!("{:?}", plain.options()).contains("table: \"oncely_records\", max_connections: 16"));
    }

    #[test]
    fn tls_parameters_reach_the_driver() {
        let url = parse(
            "postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&pool=2&sslcert=/c.pem&sslkey=/c.key",
        )
        .expect("parses");
        assert_eq!(
            url.connection_url(),
            "postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=/c.pem&sslkey=/c.key"
        );
        let options = PgConnectOptions::from_str(url.connection_url()).expect("the driver parses it");
        assert!(matches!(options.get_ssl_mode(), sqlx_postgres::PgSslMode::VerifyFull));
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            parse(&format!("postgres://db/app?sslmode={mode}")).unwrap_or_else(|e| panic!("{mode}: {e}"));
        }
        let error = parse("postgres://db/app?sslmode=sometimes").expect_err("an unknown sslmode");
        assert!(matches!(error, UrlError::Malformed(_)), "{error:?}");
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (bad, option) in [
            ("postgres://db/app?pool=0", "pool"),
            ("postgres://db/app?pool=many", "pool"),
            ("postgres://db/app?acquire_timeout=soon", "acquire_timeout"),
            ("postgres://db/app?statement_timeout=0s", "statement_timeout"),
            ("postgres://db/app?sweep_interval=-1s", "sweep_interval"),
            ("postgres://db/app?table=drop table", "table"),
        ] {
            let error = parse(bad).err().unwrap_or_else(|| panic!("{bad} is refused"));
            assert_eq!(error.option(), Some(option), "{bad}: {error}");
            assert!(error.to_string().contains(option), "{bad}: {error}");
        }
        for (half, option) in
            [("postgres://db/app?sslcert=/c.pem", "sslcert"), ("postgres://db/app?sslkey=/c.key", "sslkey")]
        {
            let error = parse(half).expect_err("half a client certificate");
            assert_eq!(error.option(), Some(option), "{error}");
            assert!(error.to_string().contains("sslcert and sslkey go together"), "{error}");
        }
        assert!(matches!(parse("mysql://db/app"), Err(UrlError::Scheme { .. })));
        let error = parse("postgres://app:s3cret@db:notaport/app").expect_err("a bad port is refused");
        assert!(matches!(error, UrlError::Malformed(_)), "{error:?}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }
}
