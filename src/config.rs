//! Configuration: environment variables with matching flags, validated once at start.
//!
//! Every value that can be wrong is checked here so that a bad deployment fails at once with one
//! line naming the variable, instead of failing later under traffic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, ValueEnum};
use url::Url;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://endpoint-stats.db";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// "Empty means unset", for every optional value: `VAR=` in an env file or a manifest says "not
/// configured", not "configured as nothing".
pub fn non_empty(value: &str) -> Option<&str> {
    Some(value.trim()).filter(|value| !value.is_empty())
}

/// `DATABASE_URL`, declared once for every command that reads it.
#[derive(Debug, Clone, Args)]
pub struct DatabaseUrlArg {
    /// Database URL: postgres://… in production; the SQLite file sqlite://endpoint-stats.db when
    /// unset or empty.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl DatabaseUrlArg {
    /// `None` when unset (an empty value counts as unset).
    pub fn configured(&self) -> Result<Option<DatabaseUrl>, ConfigError> {
        self.database_url.as_deref().and_then(non_empty).map(DatabaseUrl::parse).transpose()
    }

    /// The configured database, or the SQLite default.
    pub fn or_default(&self) -> Result<DatabaseUrl, ConfigError> {
        self.configured()?.map_or_else(|| DatabaseUrl::parse(DEFAULT_DATABASE_URL), Ok)
    }

    /// For the commands that work on PostgreSQL only: the SQLite default is refused in one line
    /// saying so, as an explicit SQLite URL is.
    pub fn postgres(&self) -> Result<Url, ConfigError> {
        match self.configured()? {
            Some(url) => url.into_postgres("DATABASE_URL"),
            None => Err(postgres_only(
                "DATABASE_URL",
                format_args!("DATABASE_URL is unset or empty, which means the SQLite file {DEFAULT_DATABASE_URL}"),
            )),
        }
    }
}

fn postgres_only(variable: &'static str, found: impl std::fmt::Display) -> ConfigError {
    ConfigError::invalid(
        variable,
        format!("this command works on PostgreSQL only, and {found} (set a postgres:// URL)"),
    )
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    #[command(flatten)]
    pub url: DatabaseUrlArg,

    /// Connections in the database pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub db_pool_size: u32,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `endpoint_stats=debug`.
    #[arg(
        long = "rust-log",
        visible_alias = "log-level",
        value_name = "FILTER",
        env = "RUST_LOG",
        default_value = "info"
    )]
    pub log_level: String,
}

/// `REDIS_URL`, declared once for every command that reads it.
#[derive(Debug, Clone, Args)]
pub struct RedisUrlArg {
    /// Redis URL for the recent-window counters shared by all replicas; in-process when unset or
    /// empty.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
}

impl RedisUrlArg {
    /// The checked URL; `None` when no Redis is configured (an empty value counts as unset).
    pub fn configured(&self) -> Result<Option<String>, ConfigError> {
        let Some(raw) = self.redis_url.as_deref().and_then(non_empty) else {
            return Ok(None);
        };
        let url = Url::parse(raw).map_err(|e| ConfigError::invalid("REDIS_URL", e))?;
        if !matches!(url.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
            return Err(ConfigError::invalid(
                "REDIS_URL",
                format!("unsupported scheme `{}` (expected redis://)", url.scheme()),
            ));
        }
        Ok(Some(raw.to_owned()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    #[command(flatten)]
    pub url: RedisUrlArg,

    /// Prefix of every Redis key this service writes (not empty).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "endpoint-stats:", value_parser = non_empty_key_prefix)]
    pub redis_key_prefix: String,
}

/// An empty prefix would put the service's keys, and what `maintain` scans and cleans, among every
/// other application's keys of a shared Redis.
fn non_empty_key_prefix(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        return Err("must not be empty: it keeps this service's keys apart from those of other applications \
                    sharing the Redis (default: endpoint-stats:)"
            .to_owned());
    }
    Ok(raw.to_owned())
}

impl RedisArgs {
    /// `None` when no Redis is configured.
    pub fn settings(&self) -> Result<Option<RedisSettings>, ConfigError> {
        Ok(self.url.configured()?.map(|url| RedisSettings { url, key_prefix: self.redis_key_prefix.clone() }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    /// TCP port to serve on.
    #[arg(long, env = "PORT", default_value_t = 9999)]
    pub port: u16,

    /// Address to bind.
    #[arg(long, env = "BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Upper bound for a counted request; past it the client gets 503.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_timeout_secs: u64,

    /// Time allowed after SIGTERM to drain in-flight requests and flush.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_grace_secs: u64,

    /// Time a client has to send a request's headers, from their first byte; then 408 and close.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_read_timeout_secs: u64,

    /// Time a keep-alive connection may stay quiet between requests before it is closed. Keep it
    /// above the idle timeout of any proxy that pools connections to the service.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout_secs: u64,

    /// Open client connections at most (lowered to fit the open-file limit); at the cap the
    /// longest-idle connection is closed to admit a new one.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
}

/// What `serve` runs with, after validation.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub redis: Option<RedisSettings>,
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub connections: ConnectionLimits,
}

/// Limits on client connections; enforced by `crate::server`, which documents them.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: DatabaseUrl,
    pub pool_size: u32,
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
}

impl RedisSettings {
    /// The URL with any password masked, for logs and error messages.
    pub fn shown_url(&self) -> String {
        Url::parse(&self.url).map_or_else(|_| "(unparsable URL)".to_owned(), |url| redact_url(&url))
    }
}

/// A validated database URL. `Debug` and `Display` never show the password.
#[derive(Clone)]
pub enum DatabaseUrl {
    Postgres(Url),
    Sqlite(String),
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(raw).map_err(|e| ConfigError::invalid("DATABASE_URL", e))?;
        match url.scheme() {
            "postgres" | "postgresql" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid("DATABASE_URL", "no host in postgres URL"));
                }
                Ok(Self::Postgres(url))
            }
            "sqlite" => Ok(Self::Sqlite(raw.to_owned())),
            other => Err(ConfigError::invalid(
                "DATABASE_URL",
                format!("unsupported scheme `{other}` (expected postgres:// or sqlite://)"),
            )),
        }
    }

    /// The URL to hand to the driver (contains the password, if any).
    pub fn expose(&self) -> &str {
        match self {
            Self::Postgres(url) => url.as_str(),
            Self::Sqlite(raw) => raw,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// The PostgreSQL URL, for the commands that work on PostgreSQL only; `variable` names where
    /// the URL came from.
    pub fn into_postgres(self, variable: &'static str) -> Result<Url, ConfigError> {
        match self {
            Self::Postgres(url) => Ok(url),
            Self::Sqlite(_) => Err(postgres_only(variable, format_args!("{variable} is a SQLite URL"))),
        }
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Postgres(url) => f.write_str(&redact_url(url)),
            Self::Sqlite(raw) => f.write_str(raw),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// Query parameters whose values are secrets: libpq's `password`, `sslpassword` (the pass phrase
/// of the client key), `oauth_client_secret`, `scram_client_key` and `scram_server_key`
/// (PostgreSQL 18), and `pass` of `redis+unix://` URLs. Compared without regard to case: masking
/// one parameter too many costs nothing.
pub const SECRET_PARAMS: &[&str] =
    &["password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key", "pass"];

pub fn is_secret_param(key: &str) -> bool {
    SECRET_PARAMS.iter().any(|secret| secret.eq_ignore_ascii_case(key))
}

/// `scheme://user:***@host:port/path?…&sslpassword=***`: safe for logs and error messages. libpq
/// and sqlx also take secrets as query parameters ([`SECRET_PARAMS`]), so those are masked too.
pub fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // set_password only fails for URLs that cannot have credentials; those have none to hide
        let _ = shown.set_password(Some("***"));
    }
    if shown.query_pairs().any(|(key, _)| is_secret_param(&key)) {
        let params: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if is_secret_param(&key) { "***".to_owned() } else { value.into_owned() };
                (key.into_owned(), value)
            })
            .collect();
        shown.set_query(None);
        shown.query_pairs_mut().extend_pairs(params);
    }
    shown.to_string()
}

#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn invalid(variable: &'static str, problem: impl std::fmt::Display) -> Self {
        Self { variable, problem: problem.to_string() }
    }
}

impl DatabaseArgs {
    pub fn settings(&self) -> Result<DatabaseSettings, ConfigError> {
        Ok(DatabaseSettings { url: self.url.or_default()?, pool_size: self.db_pool_size })
    }
}

impl ServeArgs {
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let redis = self.redis.settings()?;
        Ok(Settings {
            database: self.database.settings()?,
            redis,
            listen: SocketAddr::new(self.bind, self.port),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            connections: ConnectionLimits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
                idle_timeout: Duration::from_secs(self.idle_timeout_secs),
                max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_url_is_redacted_in_display() {
        let url = DatabaseUrl::parse("postgres://app:s3cret@db:5432/stats").expect("valid URL");
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@db"), "{shown}");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn password_in_the_query_is_redacted_too() {
        let url = DatabaseUrl::parse("postgres://app@db/stats?sslmode=require&password=s3cret").expect("valid URL");
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("sslmode=require"), "{shown}");
    }

    #[test]
    fn every_secret_parameter_is_redacted() {
        let raw = "postgres://app:s3cret0@db/stats?sslmode=require&password=s3cret1&sslpassword=s3cret2\
                   &oauth_client_secret=s3cret3&scram_client_key=s3cret4&SCRAM_SERVER_KEY=s3cret5";
        let shown = DatabaseUrl::parse(raw).expect("valid URL").to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("sslmode=require") && shown.contains("sslpassword=***"), "{shown}");
        let redis =
            RedisSettings { url: "redis+unix:///run/redis.sock?pass=s3cret6".to_owned(), key_prefix: "p:".to_owned() };
        assert!(!redis.shown_url().contains("s3cret"), "{}", redis.shown_url());
    }

    #[test]
    fn unparsable_and_unsupported_urls_name_the_variable() {
        for bad in ["not a url", "mysql://db/x", "postgres:///nohost"] {
            let err = DatabaseUrl::parse(bad).expect_err(bad);
            assert_eq!(err.variable, "DATABASE_URL", "{bad}");
        }
    }

    #[test]
    fn sqlite_default_is_accepted() {
        assert!(!DatabaseUrl::parse(DEFAULT_DATABASE_URL).expect("default").is_postgres());
    }
}
