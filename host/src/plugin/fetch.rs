//! Network access for image sources, mediated by the host. A plugin never
//! holds a socket: it asks, and the host checks the URL against the hosts
//! the plugin declared AND the operator granted, allows plain http only to
//! loopback, re-checks every redirect hop, bounds the time by the call's
//! deadline and the body by a size cap.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use url::Url;

use crate::http;

use super::bindings::image_source::cocoon::plugin::fetch::{Method, Request, Response};
use super::bindings::{ErrorKind, WitError};

/// The largest body the host ever buffers for a plugin.
pub const MAX_BODY: u64 = 64 << 20;
const MAX_REDIRECTS: usize = 5;
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// `host` or `host:port` as written in manifests and the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses `example.com`, `example.com:443`, `127.0.0.1:5000` or
    /// `[::1]:8080`; anything with a scheme, path or user is refused.
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.contains(['/', '@', '?', '#', ' ']) {
            return None;
        }
        let url = Url::parse(&format!("http://{s}/")).ok()?;
        let host = url.host_str()?.to_ascii_lowercase();
        // Url drops :80 for http; keep an explicit port as written.
        let port = match s.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && !p.ends_with(']') => Some(p.parse().ok()?),
            _ => None,
        };
        Some(HostPattern { host, port })
    }

    fn matches(&self, url: &Url) -> bool {
        let host = url.host_str().map(|h| h.to_ascii_lowercase());
        host.as_deref() == Some(self.host.as_str())
            && self
                .port
                .is_none_or(|p| url.port_or_known_default() == Some(p))
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// The hosts a plugin may reach: declared by the plugin and granted by the
/// operator. Either list alone grants nothing. A pattern without a port
/// covers every port, so the intersection of `a` and `a:5000` is `a:5000`.
pub fn effective_hosts(declared: &[String], granted: &[String]) -> Vec<HostPattern> {
    let granted: Vec<HostPattern> = granted
        .iter()
        .filter_map(|g| HostPattern::parse(g))
        .collect();
    let mut out: Vec<HostPattern> = Vec::new();
    for d in declared.iter().filter_map(|d| HostPattern::parse(d)) {
        for g in granted.iter().filter(|g| g.host == d.host) {
            let port = match (d.port, g.port) {
                (Some(a), Some(b)) if a != b => continue,
                (Some(p), _) | (None, Some(p)) => Some(p),
                (None, None) => None,
            };
            let both = HostPattern {
                host: d.host.clone(),
                port,
            };
            if !out.contains(&both) {
                out.push(both);
            }
        }
    }
    out
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

fn refuse(kind: ErrorKind, message: String) -> WitError {
    WitError::new(kind, message)
}

/// Checks one URL (the first or a redirect target) against the policy.
pub fn check_url(url: &str, allowed: &[HostPattern]) -> Result<Url, WitError> {
    let parsed = Url::parse(url)
        .map_err(|e| refuse(ErrorKind::InvalidInput, format!("bad URL {url:?}: {e}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if is_loopback(&parsed) => {}
        "http" => {
            return Err(refuse(
                ErrorKind::Unsupported,
                format!("{url}: plain http is allowed only to loopback; use https"),
            ))
        }
        other => {
            return Err(refuse(
                ErrorKind::Unsupported,
                format!("{url}: scheme {other} is not fetched"),
            ))
        }
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refuse(
            ErrorKind::InvalidInput,
            format!("{url}: credentials in URLs are refused; send a header"),
        ));
    }
    if !allowed.iter().any(|a| a.matches(&parsed)) {
        let host = parsed.host_str().unwrap_or("");
        let port = parsed.port_or_known_default().unwrap_or(0);
        return Err(refuse(
            ErrorKind::InvalidInput,
            format!("fetch of {host}:{port} denied: not a host this plugin was granted"),
        ));
    }
    Ok(parsed)
}

/// Headers a plugin may not set: the host owns routing and framing.
fn forbidden_header(name: &str) -> bool {
    const FORBIDDEN: &[&str] = &[
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    FORBIDDEN.iter().any(|f| f.eq_ignore_ascii_case(name))
}

/// The fetch policy of one store (one plugin invocation). The transport
/// is the host's shared client ([`crate::http`]); this type holds only
/// the policy.
pub struct Fetcher {
    plugin: String,
    allowed: Vec<HostPattern>,
    deadline: Instant,
}

impl Fetcher {
    pub fn new(plugin: &str, allowed: Vec<HostPattern>, deadline: Instant) -> Self {
        Fetcher {
            plugin: plugin.to_string(),
            allowed,
            deadline,
        }
    }

    /// Performs `req` under the policy, following redirects hop by hop.
    pub fn fetch(&self, req: Request) -> Result<Response, WitError> {
        let cap = req.max_bytes.min(MAX_BODY);
        let mut url = check_url(&req.url, &self.allowed)?;
        let mut headers: Vec<(String, String)> = req
            .headers
            .into_iter()
            .filter(|(k, _)| !forbidden_header(k))
            .collect();
        let mut visited = vec![url.clone()];
        loop {
            let response = self.one(&req.method, &url, &headers, cap)?;
            let location = response
                .headers
                .iter()
                .find(|(k, _)| k == "location")
                .map(|(_, v)| v.clone());
            match (
                req.follow_redirects && http::is_redirect(response.status),
                location,
            ) {
                (true, Some(location)) => {
                    let next =
                        http::next_hop(&url, &location, &visited, MAX_REDIRECTS).map_err(|e| {
                            let kind = match e {
                                http::RedirectError::TooMany { .. } => ErrorKind::LimitExceeded,
                                _ => ErrorKind::InvalidInput,
                            };
                            refuse(kind, format!("{}: {e}", http::redact(&req.url)))
                        })?;
                    let next = check_url(next.as_str(), &self.allowed)?;
                    headers.retain(|(k, _)| !http::drop_on_hop(k, &url, &next));
                    tracing::debug!(plugin = %self.plugin, from = %url, to = %next, "fetch redirect");
                    visited.push(next.clone());
                    url = next;
                }
                _ => return Ok(response),
            }
        }
    }

    fn one(
        &self,
        method: &Method,
        url: &Url,
        headers: &[(String, String)],
        cap: u64,
    ) -> Result<Response, WitError> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(refuse(
                ErrorKind::LimitExceeded,
                format!("{url}: the call's deadline has passed"),
            ));
        }
        let timeout = remaining.min(MAX_TIMEOUT);
        let method = match method {
            Method::Get => reqwest::Method::GET,
            Method::Head => reqwest::Method::HEAD,
        };
        let is_head = method == reqwest::Method::HEAD;
        let mut builder = http::client().request(method, url.clone());
        for (k, v) in headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let io = |e: reqwest::Error| {
            let kind = if e.is_timeout() {
                ErrorKind::LimitExceeded
            } else {
                ErrorKind::Io
            };
            refuse(
                kind,
                format!("{url}: {}", crate::store::chain(&e.without_url())),
            )
        };
        let exchange = async {
            let mut response = builder.send().await.map_err(io)?;
            let status = response.status().as_u16();
            let headers: Vec<(String, String)> = response
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let too_large = || {
                refuse(
                    ErrorKind::LimitExceeded,
                    format!("{url}: body is larger than {cap} bytes"),
                )
            };
            let mut body = Vec::new();
            if !is_head {
                let announced = response
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                if announced.is_some_and(|n| n > cap) {
                    return Err(too_large());
                }
                while let Some(chunk) = response.chunk().await.map_err(io)? {
                    if body.len() as u64 + chunk.len() as u64 > cap {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
            }
            Ok((status, headers, body))
        };
        let (status, headers, body) = http::block_on(async {
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(refuse(
                        ErrorKind::LimitExceeded,
                        format!(
                            "{url}: no complete answer within {} ms",
                            timeout.as_millis()
                        ),
                    ))
                })
        })?;
        Ok(Response {
            status,
            headers,
            body,
            final_url: url.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Vec<HostPattern> {
        list.iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect()
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            HostPattern::parse("Example.COM").unwrap().to_string(),
            "example.com"
        );
        assert_eq!(
            HostPattern::parse("a.b:5000").unwrap().to_string(),
            "a.b:5000"
        );
        assert_eq!(
            HostPattern::parse("[::1]:80").unwrap().to_string(),
            "[::1]:80"
        );
        for bad in ["", "http://a", "a/b", "u@a", "a:99999", "a b"] {
            assert!(HostPattern::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn effective_is_the_intersection() {
        let eff = effective_hosts(
            &["a.com".into(), "b.com:443".into(), "c.com".into()],
            &["b.com:443".into(), "c.com".into(), "d.com".into()],
        );
        assert_eq!(eff, hosts(&["b.com:443", "c.com"]));
        assert!(effective_hosts(&["a.com".into()], &[]).is_empty());
        let eff = effective_hosts(
            &["a.com".into(), "b.com:1".into()],
            &["a.com:5000".into(), "b.com".into()],
        );
        assert_eq!(eff, hosts(&["a.com:5000", "b.com:1"]));
        assert!(effective_hosts(&["a.com:1".into()], &["a.com:2".into()]).is_empty());
        assert!(effective_hosts(&[], &["a.com".into()]).is_empty());
    }

    #[test]
    fn url_policy_table() {
        let allowed = hosts(&["registry.example.com", "127.0.0.1:5000", "localhost"]);
        let cases: &[(&str, bool)] = &[
            ("https://registry.example.com/v2/", true),
            ("https://REGISTRY.example.com:443/v2/", true),
            ("https://registry.example.com:8443/v2/", true),
            ("http://registry.example.com/v2/", false),
            ("https://evil.example.com/", false),
            ("https://registry.example.com.evil.com/", false),
            ("http://127.0.0.1:5000/v2/", true),
            ("http://127.0.0.1:5001/v2/", false),
            ("http://localhost:1234/x", true),
            ("ftp://registry.example.com/", false),
            ("file:///etc/passwd", false),
            ("https://user:pw@registry.example.com/", false),
            ("not a url", false),
        ];
        for (url, ok) in cases {
            assert_eq!(check_url(url, &allowed).is_ok(), *ok, "{url}");
        }
        let e = check_url("https://evil.example.com/", &allowed).unwrap_err();
        assert!(e.message.contains("denied"), "{}", e.message);
    }

    #[test]
    fn forbidden_headers() {
        assert!(forbidden_header("Host"));
        assert!(forbidden_header("transfer-encoding"));
        assert!(!forbidden_header("authorization"));
        assert!(!forbidden_header("accept"));
    }
}
