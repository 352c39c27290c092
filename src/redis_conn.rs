//! Reaching Redis, for the service's window counters and the operations commands alike: one
//! bounded way to connect, and the memory figures of `INFO memory`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A client for `REDIS_URL` (already checked by the configuration), its error naming the variable.
pub fn open(url: &str) -> Result<redis::Client, String> {
    redis::Client::open(url).map_err(|e| format!("REDIS_URL: {e}"))
}

/// A connection that reconnects on its own. `timeout` bounds each connection attempt and each
/// answer; one retry is allowed, and the whole wait is bounded by twice `timeout`: an unreachable
/// or hung Redis costs a known time, never a hang.
pub async fn connect(client: redis::Client, timeout: Duration) -> Result<ConnectionManager, String> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(1);
    let limit = timeout * 2;
    tokio::time::timeout(limit, ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| format!("Redis did not answer within {limit:?}"))?
        .map_err(|e| format!("Redis unreachable: {e}"))
}

/// What `INFO memory` says; a field missing from the answer is `None`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MemoryInfo {
    pub used_bytes: Option<u64>,
    pub used_human: Option<String>,
    pub max_bytes: Option<u64>,
    pub max_policy: Option<String>,
}

impl MemoryInfo {
    pub async fn read(connection: &mut ConnectionManager) -> redis::RedisResult<Self> {
        let info: String = redis::cmd("INFO").arg("memory").query_async(connection).await?;
        Ok(Self::parse(&info))
    }

    /// The answer is `name:value` lines (and `# Section` headers).
    fn parse(info: &str) -> Self {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        Self {
            used_bytes: field("used_memory").and_then(|v| v.parse().ok()),
            used_human: field("used_memory_human"),
            max_bytes: field("maxmemory").and_then(|v| v.parse().ok()),
            max_policy: field("maxmemory_policy"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_fields_are_read_by_their_exact_name() {
        let info = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nused_memory_rss:9\r\n\
                    maxmemory:0\r\nmaxmemory_human:0B\r\nmaxmemory_policy:noeviction\r\n";
        let expected = MemoryInfo {
            used_bytes: Some(1_048_576),
            used_human: Some("1.00M".to_owned()),
            max_bytes: Some(0),
            max_policy: Some("noeviction".to_owned()),
        };
        assert_eq!(MemoryInfo::parse(info), expected);
        assert_eq!(MemoryInfo::parse(""), MemoryInfo::default());
    }
}
