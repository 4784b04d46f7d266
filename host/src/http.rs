//! The host's one HTTP stack: a tokio runtime and a reqwest client (rustls,
//! HTTP/1.1), both built on first use and shared by everything in the
//! process that talks HTTP: the store's downloads, the plugins' mediated
//! fetch, and whatever else needs tokio (an API server spawns onto
//! [`runtime`]).
//!
//! The client follows no redirect by itself: each caller has its own rules
//! for a hop (the mediated fetch re-checks the plugin's grants, the store
//! refuses `file://`, both drop `Authorization` across origins), so each
//! follows them with [`next_hop`]. It uses no proxy from the environment:
//! what the host may reach is decided here, not by `HTTP_PROXY`.

use std::borrow::Cow;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use url::Url;

/// The longest wait for a TCP connection (and TLS handshake) to one host.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

const USER_AGENT: &str = concat!("cocoon-host/", env!("CARGO_PKG_VERSION"));

/// The process's tokio runtime: multi-threaded with two workers, which
/// run connections and timers while the caller of [`block_on`] consumes
/// the bodies (hashing, writing) on its own thread.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cocoon-io")
            .enable_all()
            .build()
            // Only fails when the OS refuses threads or an epoll fd: the
            // host cannot do any network I/O then.
            .expect("building the tokio runtime")
    })
}

/// The process's HTTP client. Connections are pooled across requests.
pub fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .referer(false)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(USER_AGENT)
            .build()
            // Fails only if the TLS backend cannot be set up, which with
            // the compiled-in roots and ring does not depend on input.
            .expect("building the HTTP client")
    })
}

/// Runs `future` to completion on [`runtime`] from synchronous code. From
/// inside a runtime (where blocking on another would panic) it runs on a
/// scoped thread of its own.
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| runtime().block_on(future))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        runtime().block_on(future)
    }
}

/// `s` with the user-info of its URL (`user:password@`) replaced by
/// `***@`, so that credentials are never printed or stored. Strings that
/// are not `scheme://…` are returned as they are.
pub fn redact(s: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Cow::Borrowed(s);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if &rest[..at] != "***" => Cow::Owned(format!("{scheme}://***{}", &rest[at..])),
        _ => Cow::Borrowed(s),
    }
}

/// `text` with the user-info of every URL in it replaced by `***@`: for
/// messages that may quote a URL someone else wrote (a plugin's error).
pub fn redact_text(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| "/?#\"'()<>".contains(c) || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) if &authority[..at] != "***" => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Why a redirect is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("redirect to {location:?}, which is not a URL")]
    BadLocation { location: String },
    #[error("redirect to the local file {location}: refused, only http(s) is fetched")]
    ToFile { location: String },
    #[error("redirect to {location}: scheme {scheme} is not fetched")]
    UnsupportedScheme { location: String, scheme: String },
    #[error("redirect loop: {location} was already visited")]
    Loop { location: String },
    #[error("more than {max} redirects")]
    TooMany { max: usize },
}

/// Where a redirect from `current` to `location` leads, given the URLs
/// visited so far (`visited` includes `current`): a loop, a non-http(s)
/// target and a chain longer than `max` are refused. The caller applies
/// its own host policy to the result.
pub fn next_hop(
    current: &Url,
    location: &str,
    visited: &[Url],
    max: usize,
) -> Result<Url, RedirectError> {
    let next = current
        .join(location)
        .map_err(|_| RedirectError::BadLocation {
            location: redact_text(location).into_owned(),
        })?;
    match next.scheme() {
        "http" | "https" => {}
        "file" => {
            return Err(RedirectError::ToFile {
                location: redact(next.as_str()).into_owned(),
            })
        }
        other => {
            return Err(RedirectError::UnsupportedScheme {
                location: redact(next.as_str()).into_owned(),
                scheme: other.to_string(),
            })
        }
    }
    if visited.contains(&next) {
        return Err(RedirectError::Loop {
            location: redact(next.as_str()).into_owned(),
        });
    }
    if visited.len() > max {
        return Err(RedirectError::TooMany { max });
    }
    Ok(next)
}

/// Whether a request header must not follow a hop from `from` to `to`:
/// credentials meant for one origin never reach another.
pub fn drop_on_hop(name: &str, from: &Url, to: &Url) -> bool {
    from.origin() != to.origin()
        && ["authorization", "cookie", "proxy-authorization"]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
}

/// The statuses that redirect (with a `Location`).
pub fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_table() {
        let cases = [
            ("https://u:p@h/x", "https://***@h/x"),
            ("https://u@h:5000/x?y", "https://***@h:5000/x?y"),
            ("http://a:b@c@h/x", "http://***@h/x"),
            ("https://***@h/x", "https://***@h/x"),
            ("https://h/x@sha256:aa", "https://h/x@sha256:aa"),
            ("https://h/x?q=a@b", "https://h/x?q=a@b"),
            ("oci://reg/repo@sha256:aa", "oci://reg/repo@sha256:aa"),
            ("/home/u@x/disk.img", "/home/u@x/disk.img"),
            ("file:///a@b", "file:///a@b"),
            ("plain", "plain"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    #[test]
    fn redaction_in_text() {
        let cases = [
            (
                "fetching \"https://u:p@h/x\": 401",
                "fetching \"https://***@h/x\": 401",
            ),
            (
                "a http://u:p@h b https://v:q@k:1/y c",
                "a http://***@h b https://***@k:1/y c",
            ),
            ("no urls here", "no urls here"),
            ("https://h/x a@b", "https://h/x a@b"),
            ("ends with https://u:p@h", "ends with https://***@h"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_text(input), want, "{input}");
        }
    }

    #[test]
    fn redirect_hops() {
        let here = Url::parse("https://a.example/x/y").unwrap();
        let visited = vec![here.clone()];
        let ok = |l: &str| next_hop(&here, l, &visited, 5).map(|u| u.to_string());
        assert_eq!(ok("/z").unwrap(), "https://a.example/z");
        assert_eq!(ok("z").unwrap(), "https://a.example/x/z");
        assert_eq!(ok("http://b.example/").unwrap(), "http://b.example/");
        assert!(matches!(
            ok("file:///etc/passwd"),
            Err(RedirectError::ToFile { .. })
        ));
        assert!(matches!(
            ok("ftp://b.example/"),
            Err(RedirectError::UnsupportedScheme { .. })
        ));
        assert!(matches!(ok("/x/y"), Err(RedirectError::Loop { .. })));
        assert!(matches!(
            ok("http://[::1"),
            Err(RedirectError::BadLocation { .. })
        ));
        let long: Vec<Url> = (0..6)
            .map(|i| Url::parse(&format!("https://a.example/{i}")).unwrap())
            .collect();
        assert_eq!(
            next_hop(&here, "/new", &long, 5),
            Err(RedirectError::TooMany { max: 5 })
        );
        // Credentials in a Location are never echoed.
        for location in [
            "ftp://u:secret@h/x",
            "http://u:secret@[::1",
            "https://u:secret@h/x/y",
        ] {
            let hop = next_hop(&here, location, &visited, 5);
            let shown = match &hop {
                Ok(u) => redact(u.as_str()).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn credentials_stay_with_their_origin() {
        let a = Url::parse("https://a.example/x").unwrap();
        let a2 = Url::parse("https://a.example/y").unwrap();
        let b = Url::parse("https://b.example/x").unwrap();
        let a_http = Url::parse("http://a.example/x").unwrap();
        assert!(!drop_on_hop("Authorization", &a, &a2));
        assert!(drop_on_hop("Authorization", &a, &b));
        assert!(drop_on_hop("cookie", &a, &a_http));
        assert!(!drop_on_hop("accept", &a, &b));
    }

    #[test]
    fn block_on_works_inside_a_runtime_too() {
        assert_eq!(block_on(async { 1 + 1 }), 2);
        let inner = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(inner.block_on(async { block_on(async { 3 }) }), 3);
    }
}
