//! The connection to the shared store, whatever its topology:
//!
//! - one server (`redis://`, `rediss://`): redis's connection manager, which reconnects;
//! - Sentinel (`redis+sentinel://`, `rediss+sentinel://`): the master the sentinels name,
//!   asked again after any failure (a failover moves the master; the old one, back, is a
//!   replica that refuses writes);
//! - Cluster (`redis+cluster://`, `rediss+cluster://`): redis's cluster connection, which
//!   follows MOVED and ASK redirections and the cluster's slot map. A pipeline must stay on
//!   one slot there, so writes are sent one command each, concurrently.

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ConnectionAddr, Pipeline, RedisFuture, TlsMode, Value};

/// How the store is reached, as the settings give it (one, made once: its size is no cost).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Topology {
    Single(redis::Client),
    Sentinel {
        sentinels: Vec<ConnectionAddr>,
        master: String,
        db: i64,
        username: Option<String>,
        password: Option<String>,
        sentinel_password: Option<String>,
        tls: bool,
    },
    Cluster(redis::cluster::ClusterClient),
}

impl Topology {
    pub fn name(&self) -> &'static str {
        match self {
            Topology::Single(_) => "single",
            Topology::Sentinel { .. } => "sentinel",
            Topology::Cluster(_) => "cluster",
        }
    }
}

/// A live link to the store (one, made once).
#[allow(clippy::large_enum_variant)]
pub enum Link {
    Single(ConnectionManager),
    Sentinel(Box<SentinelLink>),
    Cluster(
        tokio::sync::OnceCell<ClusterConnection>,
        redis::cluster::ClusterClient,
    ),
}

/// The master the sentinels name, and the connection to it.
pub struct SentinelLink {
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
}

/// A connection for one command or pipeline.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Link {
    /// Starts a link; it connects on first use, so a store down at start does not keep the
    /// bridge from starting.
    pub fn start(topology: Topology, timeout: Duration) -> redis::RedisResult<Link> {
        let connect = timeout.max(Duration::from_millis(500));
        match topology {
            Topology::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(connect))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Ok(Link::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
            Topology::Sentinel {
                sentinels,
                master,
                db,
                username,
                password,
                sentinel_password,
                tls,
            } => {
                let mut builder =
                    SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)?
                        .set_client_to_redis_db(db);
                if tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                }
                if let Some(username) = username {
                    builder = builder.set_client_to_redis_username(username);
                }
                if let Some(password) = password {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some(password) = sentinel_password {
                    builder = builder.set_client_to_sentinel_password(password);
                }
                Ok(Link::Sentinel(Box::new(SentinelLink {
                    client: tokio::sync::Mutex::new(builder.build()?),
                    current: std::sync::Mutex::new(None),
                    config: AsyncConnectionConfig::new()
                        .set_response_timeout(Some(timeout))
                        .set_connection_timeout(Some(connect)),
                })))
            }
            Topology::Cluster(client) => Ok(Link::Cluster(tokio::sync::OnceCell::new(), client)),
        }
    }

    /// Whether a pipeline may hold commands for any key.
    pub fn pipelines(&self) -> bool {
        !matches!(self, Link::Cluster(..))
    }

    /// A connection to send a command on.
    pub async fn conn(&self) -> redis::RedisResult<Conn> {
        match self {
            Link::Single(c) => Ok(Conn::Single(c.clone())),
            Link::Sentinel(s) => s.conn().await.map(Conn::Multiplexed),
            Link::Cluster(cell, client) => cell
                .get_or_try_init(|| client.get_async_connection())
                .await
                .cloned()
                .map(Conn::Cluster),
        }
    }

    /// A command on this link failed: with Sentinel, the master is asked for again before the
    /// next one (it may have moved).
    pub fn failed(&self) {
        if let Link::Sentinel(s) = self {
            s.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
}

impl SentinelLink {
    async fn conn(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let mut client = self.client.lock().await;
        // Another command may have connected while this one waited.
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let master = client.async_get_client().await?;
        let c = master
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The topology of a `dedup.redis_url`, or why it is not one. `password` is the data nodes'
/// password when the URL has none; `sentinel_password` the sentinels' own. Sentinel and
/// cluster URLs list several hosts (`host:port,host:port`), which no URL parser takes.
pub fn topology(
    url: &str,
    password: Option<String>,
    sentinel_password: Option<String>,
    timeout: Duration,
) -> Result<Topology, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a URL".to_owned())?;
    let (kind, tls) = match scheme {
        "redis" | "rediss" => return single(url, password),
        "redis+sentinel" => ("sentinel", false),
        "rediss+sentinel" => ("sentinel", true),
        "redis+cluster" => ("cluster", false),
        "rediss+cluster" => ("cluster", true),
        _ => return Err(format!("unknown scheme `{scheme}`")),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (username, url_password) = credentials(userinfo)?;
    let password = url_password.or(password);
    let addrs = addresses(hosts, tls)?;
    if kind == "sentinel" {
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let master = parts
            .next()
            .ok_or("a sentinel URL ends with /<master name>")?
            .to_owned();
        let db = match parts.next() {
            Some(db) => db
                .parse()
                .map_err(|_| format!("`{db}` is no database number"))?,
            None => 0,
        };
        return Ok(Topology::Sentinel {
            sentinels: addrs,
            master,
            db,
            username,
            password,
            sentinel_password,
            tls,
        });
    }
    if !path.is_empty() {
        return Err("a cluster URL has no path: a cluster has database 0 only".into());
    }
    cluster(addrs, username, password, tls, timeout)
}

/// One server's `redis://` or `rediss://` URL, through the client's own parser.
fn single(url: &str, password: Option<String>) -> Result<Topology, String> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)
        // The parser's message may quote the URL, and with it a password.
        .map_err(|e| format!("not a Redis URL ({:?})", e.kind()))?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let client = redis::Client::open(info).map_err(|e| format!("unusable ({:?})", e.kind()))?;
    Ok(Topology::Single(client))
}

/// The user name and password of a URL's `user:password@`, percent-decoded.
fn credentials(userinfo: Option<&str>) -> Result<(Option<String>, Option<String>), String> {
    let Some(userinfo) = userinfo else {
        return Ok((None, None));
    };
    let (user, pass) = match userinfo.split_once(':') {
        Some((user, pass)) => (user, Some(percent_decode(pass)?)),
        None => (userinfo, None),
    };
    let user = percent_decode(user)?;
    Ok(((!user.is_empty()).then_some(user), pass))
}

/// The addresses of `host:port,host:port`.
fn addresses(hosts: &str, tls: bool) -> Result<Vec<ConnectionAddr>, String> {
    hosts
        .split(',')
        .map(|host| {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| format!("`{host}` has no port"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{host}` has no valid port"))?;
            if name.is_empty() {
                return Err(format!("`{host}` has no host"));
            }
            Ok(if tls {
                ConnectionAddr::TcpTls {
                    host: name.to_owned(),
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(name.to_owned(), port)
            })
        })
        .collect()
}

/// A cluster client that starts from `addrs`.
fn cluster(
    addrs: Vec<ConnectionAddr>,
    username: Option<String>,
    password: Option<String>,
    tls: bool,
    timeout: Duration,
) -> Result<Topology, String> {
    let nodes: Vec<redis::ConnectionInfo> = addrs
        .into_iter()
        .map(|addr| {
            let mut info = redis::IntoConnectionInfo::into_connection_info(addr)
                .map_err(|e| format!("unusable ({:?})", e.kind()))?;
            let mut settings = info.redis_settings().clone();
            if let Some(password) = &password {
                settings = settings.set_password(password.clone());
            }
            if let Some(username) = &username {
                settings = settings.set_username(username.clone());
            }
            info = info.set_redis_settings(settings);
            Ok(info)
        })
        .collect::<Result<_, String>>()?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(timeout.max(Duration::from_millis(500)))
        .response_timeout(timeout)
        .retries(2);
    if tls {
        builder = builder.tls(TlsMode::Secure);
    }
    let client = builder
        .build()
        .map_err(|e| format!("unusable ({:?})", e.kind()))?;
    Ok(Topology::Cluster(client))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad %-escape in the URL's credentials")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's credentials are not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(250);

    #[test]
    fn urls_of_each_topology() {
        assert_eq!(
            topology("redis://h:1/2", None, None, T).unwrap().name(),
            "single"
        );
        match topology(
            "redis+sentinel://u:p%40ss@s1:26379,s2:26380/mymaster/3",
            None,
            Some("sp".into()),
            T,
        )
        .unwrap()
        {
            Topology::Sentinel {
                sentinels,
                master,
                db,
                username,
                password,
                sentinel_password,
                tls,
            } => {
                assert_eq!(sentinels.len(), 2);
                assert_eq!(master, "mymaster");
                assert_eq!(db, 3);
                assert_eq!(username.as_deref(), Some("u"));
                assert_eq!(password.as_deref(), Some("p@ss"));
                assert_eq!(sentinel_password.as_deref(), Some("sp"));
                assert!(!tls);
            }
            _ => panic!("not sentinel"),
        }
        assert_eq!(
            topology("rediss+cluster://a:7000,b:7001", Some("pw".into()), None, T)
                .unwrap()
                .name(),
            "cluster"
        );
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1/m",
            "redis+cluster://a:7000/1",
            "memcached://a:1",
            "redis+cluster://:7000",
        ] {
            assert!(topology(bad, None, None, T).is_err(), "{bad}");
        }
    }
}
