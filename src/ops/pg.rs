//! PostgreSQL for the operations commands: one connection at a time, the client tools
//! (`pg_dump`, `pg_restore`) with their connection in a private service file only, and the
//! inventory of a database (tables, columns, indexes, row counts, migrations) that manifests
//! record and restores are checked against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, PgConnection, Row};
use url::Url;

use super::dumps::TableInfo;
use super::sql_failed;
use crate::config::{redact_url, ConfigError, DatabaseArgs, DatabaseUrl};
use crate::store::pg_connect_options;

/// Bound on establishing a connection (server down, packets dropped).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection keywords of libpq (PostgreSQL 12 to 18) that a URL may carry for the client tools.
/// Others (sqlx-only ones such as `statement-cache-capacity`) are not handed to them; `service`
/// and `replication` are the tools' business.
const LIBPQ_PARAMS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslcertmode",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "require_auth",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "min_protocol_version",
    "max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "target_session_attrs",
    "load_balance_hosts",
    "scram_client_key",
    "scram_server_key",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
];
/// sqlx's spellings of libpq keywords, as the tools need them.
const SQLX_ALIASES: &[(&str, &str)] = &[
    ("ssl-mode", "sslmode"),
    ("ssl-root-cert", "sslrootcert"),
    ("ssl-ca", "sslrootcert"),
    ("ssl-cert", "sslcert"),
    ("ssl-key", "sslkey"),
];
/// The service name in the connection service file handed to the tools.
const SERVICE_NAME: &str = "endpoint-stats";

/// A PostgreSQL database to work on. `Display` never shows the password.
#[derive(Clone)]
pub struct PgTarget {
    url: Url,
}

impl PgTarget {
    /// `variable` names where the URL came from, for error messages.
    pub fn parse(raw: &str, variable: &'static str) -> Result<Self, ConfigError> {
        let parsed = DatabaseUrl::parse(raw).map_err(|error| ConfigError::invalid(variable, error.problem))?;
        Ok(Self { url: parsed.into_postgres(variable)? })
    }

    /// The database of `DATABASE_URL`, read as every command reads it.
    pub fn from_args(args: &DatabaseArgs) -> Result<Self, ConfigError> {
        Ok(Self { url: args.url.postgres()? })
    }

    /// The same server, another database.
    pub fn with_database(&self, name: &str) -> Self {
        let mut url = self.url.clone();
        url.set_path(&format!("/{name}"));
        let params: Vec<(String, String)> =
            url.query_pairs().filter(|(k, _)| k != "dbname").map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        url.set_query(None);
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        Self { url }
    }

    /// The database name in the URL (the server's default, the user name, when there is none).
    pub fn database_name(&self) -> String {
        let path = self.url.path().trim_start_matches('/');
        let from_query = self.url.query_pairs().find(|(k, _)| k == "dbname").map(|(_, v)| v.into_owned());
        match (path.is_empty(), from_query) {
            (false, _) => percent_decode(path),
            (true, Some(name)) => name,
            (true, None) => percent_decode(self.url.username()),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        let options = pg_connect_options(&self.url)
            .map_err(sql_failed(format_args!("invalid PostgreSQL URL {self}")))?
            .application_name("endpoint-stats-ops");
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(sql_failed(format_args!("cannot connect to {self}"))(error)),
            Err(_) => anyhow::bail!("cannot connect to {self}: no answer within {CONNECT_TIMEOUT:?}"),
        }
    }

    /// The libpq keywords of this URL, decoded: its parts first, then its query parameters (which
    /// override them, as in libpq). Parameters libpq does not know are left out.
    fn libpq_keywords(&self) -> anyhow::Result<BTreeMap<&'static str, String>> {
        let mut keywords = BTreeMap::new();
        if let Some(host) = self.url.host_str().filter(|h| !h.is_empty()) {
            // An IPv6 literal is bracketed in a URL, bare in a keyword.
            keywords.insert("host", host.trim_start_matches('[').trim_end_matches(']').to_owned());
        }
        if let Some(port) = self.url.port() {
            keywords.insert("port", port.to_string());
        }
        let path = self.url.path().trim_start_matches('/');
        if !path.is_empty() {
            keywords.insert("dbname", percent_decode(path));
        }
        if !self.url.username().is_empty() {
            keywords.insert("user", percent_decode(self.url.username()));
        }
        if let Some(password) = self.url.password() {
            keywords.insert("password", percent_decode(password));
        }
        for (key, value) in self.url.query_pairs() {
            let key = SQLX_ALIASES.iter().find(|(alias, _)| *alias == key).map_or(key.as_ref(), |(_, name)| name);
            if let Some(keyword) = LIBPQ_PARAMS.iter().find(|k| **k == key) {
                keywords.insert(*keyword, value.into_owned());
            }
        }
        // A service file has one `keyword=value` per line, and libpq strips white space at its end.
        let unfit = |v: &String| v.contains(['\n', '\r', '\0']) || v.ends_with(char::is_whitespace);
        if let Some((keyword, _)) = keywords.iter().find(|(_, v)| unfit(v)) {
            anyhow::bail!(
                "the {keyword} of the PostgreSQL URL {self} holds a line break or NUL, or ends with white space, \
                 which the PostgreSQL tools cannot be given"
            );
        }
        Ok(keywords)
    }

    /// A client tool connected to this database, never prompting, giving up on an unreachable
    /// server. Every connection parameter, secrets included, reaches it through a connection
    /// service file readable by this user only (`PGSERVICEFILE`): an argument list is visible to
    /// every user of the machine (`ps`), and libpq has no variable for `sslpassword`.
    pub fn tool_command(&self, program: &Path) -> anyhow::Result<ToolCommand> {
        let mut text = format!("[{SERVICE_NAME}]\n");
        for (keyword, value) in self.libpq_keywords()? {
            text.push_str(&format!("{keyword}={value}\n"));
        }
        let service_file = write_private_temp_file("endpoint-stats-pg-service-", &text)
            .context("cannot write the connection service file for the PostgreSQL tools (in TMPDIR)")?;
        let mut command = tokio::process::Command::new(program);
        command
            .arg("--no-password")
            .arg(format!("--dbname=service={SERVICE_NAME}"))
            .env("PGSERVICEFILE", service_file.path())
            .env("PGSERVICE", SERVICE_NAME);
        if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
            command.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT.as_secs().to_string());
        }
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        Ok(ToolCommand { command, service_file })
    }
}

/// A client tool and the service file it connects with, which is removed when this drops (after
/// the tool has exited, or when the work is abandoned: the tool is then killed).
pub struct ToolCommand {
    pub command: tokio::process::Command,
    service_file: tempfile::NamedTempFile,
}

/// A new file in TMPDIR holding `contents`, mode 0600 whatever the umask, removed on drop.
fn write_private_temp_file(prefix: &str, contents: &str) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut file = tempfile::Builder::new().prefix(prefix).tempfile()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())?;
    file.flush()?;
    Ok(file)
}

impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.url))
    }
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTarget({self})")
    }
}

/// `%XX` decoding of a URL component (user names, passwords, database names).
pub fn percent_decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned()
}

/// Where a PostgreSQL client tool is: in `bin_dir` when given, else on `PATH`.
pub fn find_tool(name: &str, bin_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        if is_executable(&path) {
            return Ok(path);
        }
        anyhow::bail!("{name} not found in --pg-bin-dir {} (no executable {})", dir.display(), path.display());
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var).map(|dir| dir.join(name)).find(|p| is_executable(p)).with_context(|| {
        format!(
            "{name} not found in PATH: install the PostgreSQL client tools of the server's major version \
             (Debian: postgresql-client), or point --pg-bin-dir at them"
        )
    })
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Runs a client tool to completion; on failure, the error carries its last lines of stderr.
pub async fn run_tool(tool: ToolCommand, name: &str) -> anyhow::Result<()> {
    let ToolCommand { mut command, service_file } = tool;
    let result = run_to_completion(&mut command, name).await;
    if let Err(error) = service_file.close() {
        tracing::warn!(%error, "cannot remove the connection service file of {name}");
    }
    result
}

async fn run_to_completion(command: &mut tokio::process::Command, name: &str) -> anyhow::Result<()> {
    let child = command.spawn().map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!("{name} not found: {error}"),
        _ => anyhow::anyhow!("cannot start {name}: {error}"),
    })?;
    let output = child.wait_with_output().await.with_context(|| format!("waiting for {name}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        let status = output.status.code().map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit {c}"));
        anyhow::bail!("{name} failed ({status}): {}", if tail.is_empty() { "no message" } else { &tail });
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        tracing::warn!(tool = name, "{line}");
    }
    Ok(())
}

/// `pg_dump --version` and the like: the first line of stdout.
pub async fn tool_version(program: &Path) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        anyhow::bail!("{} --version failed", program.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().trim().to_owned())
}

/// `"schema"."table"`, quoted for SQL.
pub fn quote_table(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What a database holds, as the manifest records it.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// `schema.table` → rows, columns, indexes.
    pub tables: BTreeMap<String, TableInfo>,
    pub migrations: Vec<i64>,
}

/// Ordinary tables of the database outside the system schemas (and not owned by an extension),
/// as `(schema, table)`.
pub async fn user_tables(connection: &mut PgConnection) -> anyhow::Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                         AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *connection)
    .await
    .map_err(sql_failed("listing tables"))?;
    rows.iter()
        .map(|row| Ok((row.try_get("schema")?, row.try_get("name")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| anyhow::anyhow!("listing tables: {e}"))
}

/// The columns of a table (quoted name) as manifests record them: `name type [not null]`, in
/// column order.
pub async fn table_columns(connection: &mut PgConnection, quoted: &str) -> Result<Vec<String>, sqlx::Error> {
    let columns: Vec<(String,)> = sqlx::query_as(
        "SELECT attname || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' not null' ELSE '' END \
         FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(quoted)
    .fetch_all(&mut *connection)
    .await?;
    Ok(columns.into_iter().map(|(c,)| c).collect())
}

/// Tables, columns, indexes, exact row counts and applied migrations, all read on `connection`
/// (in its snapshot, when it is inside a REPEATABLE READ transaction).
pub async fn inventory(connection: &mut PgConnection) -> anyhow::Result<Inventory> {
    let mut inventory = Inventory::default();
    for (schema, table) in user_tables(connection).await? {
        let qualified = format!("{schema}.{table}");
        let quoted = quote_table(&schema, &table);
        let fail = sql_failed(format!("inspecting {qualified}"));
        let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {quoted}"))
            .fetch_one(&mut *connection)
            .await
            .map_err(&fail)?;
        let columns = table_columns(connection, &quoted).await.map_err(&fail)?;
        let indexes: Vec<(String,)> =
            sqlx::query_as("SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1::regclass ORDER BY 1")
                .bind(&quoted)
                .fetch_all(&mut *connection)
                .await
                .map_err(&fail)?;
        inventory
            .tables
            .insert(qualified, TableInfo { rows, columns, indexes: indexes.into_iter().map(|(i,)| i).collect() });
    }
    let has_migrations: (bool,) = sqlx::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *connection)
        .await
        .map_err(sql_failed("looking for _sqlx_migrations"))?;
    if has_migrations.0 {
        let versions: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
                .fetch_all(&mut *connection)
                .await
                .map_err(sql_failed("reading _sqlx_migrations"))?;
        inventory.migrations = versions.into_iter().map(|(v,)| v).collect();
    }
    Ok(inventory)
}

/// The tables every dump of this service must hold.
pub const SERVICE_TABLES: &[&str] = &["public.endpoint_access", "public._sqlx_migrations"];

/// Differences between what a manifest recorded and what a database holds, one line each.
/// `strict`: tables the manifest does not know are faults too (a scratch restore must hold
/// exactly the dump; a restore into a live database may hold more).
pub fn compare(
    expected_tables: &BTreeMap<String, TableInfo>,
    expected_migrations: &[i64],
    actual: &Inventory,
    strict: bool,
) -> Vec<String> {
    let mut faults = Vec::new();
    for required in SERVICE_TABLES {
        if !expected_tables.contains_key(*required) {
            faults.push(format!("expected table {required} is not in the manifest"));
        }
    }
    for (name, expected) in expected_tables {
        let Some(found) = actual.tables.get(name) else {
            faults.push(format!("table {name} missing after restore"));
            continue;
        };
        if found.rows != expected.rows {
            faults.push(format!("row count mismatch in {name}: manifest {}, restored {}", expected.rows, found.rows));
        }
        if found.columns != expected.columns {
            faults.push(format!(
                "columns of {name} differ: manifest [{}], restored [{}]",
                expected.columns.join(", "),
                found.columns.join(", ")
            ));
        }
        if found.indexes != expected.indexes {
            faults.push(format!(
                "indexes of {name} differ: manifest [{}], restored [{}]",
                expected.indexes.join("; "),
                found.indexes.join("; ")
            ));
        }
    }
    if strict {
        for name in actual.tables.keys().filter(|n| !expected_tables.contains_key(*n)) {
            faults.push(format!("unexpected table {name} (not in the manifest)"));
        }
    }
    if actual.migrations != expected_migrations {
        faults.push(format!(
            "_sqlx_migrations versions differ: manifest {expected_migrations:?}, restored {:?}",
            actual.migrations
        ));
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_keywords_are_decoded_and_sqlx_only_parameters_left_out() {
        let target = PgTarget::parse(
            "postgres://app:p%40ss@db:5432/stats?ssl-mode=require&statement-cache-capacity=10&sslpassword=k%20ey",
            "DATABASE_URL",
        )
        .expect("valid");
        let keywords = target.libpq_keywords().expect("keywords");
        let expected: BTreeMap<&str, String> = [
            ("host", "db"),
            ("port", "5432"),
            ("dbname", "stats"),
            ("user", "app"),
            ("password", "p@ss"),
            ("sslmode", "require"),
            ("sslpassword", "k ey"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        assert_eq!(keywords, expected);
        assert!(!target.to_string().contains("p%40ss") && !target.to_string().contains("k%20ey"));
        assert_eq!(target.database_name(), "stats");
        assert_eq!(target.with_database("other").database_name(), "other");
    }

    #[test]
    fn query_parameters_override_url_parts_and_line_breaks_are_refused() {
        let target = PgTarget::parse("postgres://[::1]/x?password=s3cret&dbname=y", "DATABASE_URL").expect("valid");
        let keywords = target.libpq_keywords().expect("keywords");
        assert_eq!(keywords.get("host").map(String::as_str), Some("::1"));
        assert_eq!(keywords.get("password").map(String::as_str), Some("s3cret"));
        assert_eq!(keywords.get("dbname").map(String::as_str), Some("y"));
        for unfit in ["a%0Ab", "ab%20"] {
            let broken =
                PgTarget::parse(&format!("postgres://db/x?sslpassword={unfit}"), "DATABASE_URL").expect("valid");
            let error = broken.libpq_keywords().expect_err(unfit).to_string();
            assert!(error.contains("sslpassword") && !error.contains("ab"), "{error}");
        }
    }

    #[tokio::test]
    async fn the_service_file_is_private_and_removed_after_the_tool() {
        let target = PgTarget::parse("postgres://app:s3cret@db/x", "DATABASE_URL").expect("valid");
        let tool = target.tool_command(Path::new("/bin/true")).expect("tool command");
        let path = tool.service_file.path().to_owned();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("service file").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("[endpoint-stats]\n") && text.contains("password=s3cret\n"), "{text}");
        let args: Vec<String> = tool.command.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.iter().all(|a| !a.contains("s3cret")), "{args:?}");
        run_tool(tool, "true").await.expect("runs");
        assert!(!path.exists(), "removed after the tool");
    }

    #[test]
    fn sqlite_is_refused_with_the_variable_named() {
        let error = PgTarget::parse("sqlite://x.db", "DATABASE_URL").expect_err("sqlite");
        assert!(error.to_string().starts_with("DATABASE_URL: "), "{error}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2"), "a b%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_table("public", "endpoint_access"), "\"public\".\"endpoint_access\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
