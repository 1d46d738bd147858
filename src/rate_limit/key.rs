//! Which connection (bucket) a request belongs to.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use http::request::Parts;
use http::uri::{Authority, Scheme};

/// Names the connection a request belongs to: put it in the request's
/// extensions, and [`RateLimitLayer::per_connection`](crate::RateLimitLayer::per_connection)
/// spends that connection's quota.
///
/// Power Automate throttles per *connection*, and users spread load over
/// several connections to the same service to multiply their capacity; this
/// is that connection's name.
///
/// ```
/// use tollgate::ConnectionKey;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(ConnectionKey::new("sharepoint-2"));
/// ```
///
/// Without one, a request's key is its URI's scheme and authority (host and
/// port, as hyper's connection pool keys connections); requests with neither
/// (relative URIs) share a single bucket.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConnectionKey(Repr);

#[derive(Clone, Eq)]
enum Repr {
    Named(Arc<str>),
    // An http(s) origin short enough to keep inline: building, hashing
    // and comparing it touch no shared counter and no other cache line
    // (the stored key's bytes are not a cache miss away).
    Inline(InlineOrigin),
    // Clones of the request URI's parts: reference counts, no allocation.
    // The authority is lowercase (a copy only when the URI's was not), so
    // that it hashes and compares as plain bytes: `Authority`'s own `Hash`
    // lowercases byte by byte (with its `eq`, 7% of a one-key `RateLimit`
    // call's samples under perf, issue 16).
    Origin(Option<Scheme>, Authority),
    NoAuthority,
}

impl PartialEq for Repr {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            // A key found in a store is usually a clone of the caller's: the
            // same allocation, so compare pointers before bytes (`Arc<str>`
            // does not, `str` being unsized).
            (Repr::Named(a), Repr::Named(b)) => Arc::ptr_eq(a, b) || a == b,
            (Repr::Origin(s1, a1), Repr::Origin(s2, a2)) => a1.as_str() == a2.as_str() && s1 == s2,
            (Repr::Inline(a), Repr::Inline(b)) => a == b,
            (Repr::NoAuthority, Repr::NoAuthority) => true,
            _ => false,
        }
    }
}

// By content, as `eq` compares (pointer equality implies equal content).
impl Hash for Repr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Repr::Named(name) => {
                state.write_u8(0);
                name.hash(state);
            }
            Repr::Origin(scheme, authority) => {
                state.write_u8(1);
                scheme.hash(state);
                authority.as_str().hash(state);
            }
            Repr::NoAuthority => state.write_u8(2),
            Repr::Inline(origin) => {
                state.write_u8(3);
                origin.hash(state);
            }
        }
    }
}

impl ConnectionKey {
    /// A connection named by the caller.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        ConnectionKey(Repr::Named(name.into()))
    }

    /// The key a request gets without a `ConnectionKey` extension.
    pub fn of_uri(uri: &http::Uri) -> Self {
        match uri.authority() {
            Some(authority) => match InlineOrigin::new(uri.scheme_str(), authority.as_str()) {
                Some(origin) => ConnectionKey(Repr::Inline(origin)),
                None => ConnectionKey(Repr::Origin(uri.scheme().cloned(), lowercase(authority))),
            },
            None => ConnectionKey(Repr::NoAuthority),
        }
    }
}

/// The longest authority (`host:port`) kept inline: the key stays 48
/// bytes, as long as the `Origin` variant.
const INLINE: usize = 38;

/// A request's scheme, when it is one an inline origin records.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
enum InlineScheme {
    None,
    Http,
    Https,
}

/// An origin kept in the key itself: its scheme and its authority, in
/// lowercase, zero-padded (so that derived equality and hashing are by
/// content).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct InlineOrigin {
    scheme: InlineScheme,
    len: u8,
    bytes: [u8; INLINE],
}

impl InlineOrigin {
    /// The inline form of `scheme://authority`, if it has one: no scheme,
    /// http or https, and an authority of at most `INLINE` bytes. Which
    /// form an origin takes depends on its content only, so one origin
    /// always has the same key.
    fn new(scheme: Option<&str>, authority: &str) -> Option<Self> {
        let scheme = match scheme {
            None => InlineScheme::None,
            Some("http") => InlineScheme::Http,
            Some("https") => InlineScheme::Https,
            Some(_) => return None,
        };
        if authority.len() > INLINE {
            return None;
        }
        let mut bytes = [0; INLINE];
        for (to, from) in bytes.iter_mut().zip(authority.bytes()) {
            *to = from.to_ascii_lowercase();
        }
        Some(InlineOrigin {
            scheme,
            len: authority.len() as u8,
            bytes,
        })
    }

    fn authority(&self) -> &str {
        // Lowercased from a `&str`'s bytes, ASCII only changed: still UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

/// `authority` in lowercase, as hosts compare (RFC 3986, 6.2.2.1): a
/// clone if it already is.
fn lowercase(authority: &Authority) -> Authority {
    let text = authority.as_str();
    if !text.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return authority.clone();
    }
    // Lowercasing keeps a valid authority valid; were it refused, the key
    // would only tell case apart, as bytes do.
    Authority::try_from(text.to_ascii_lowercase()).unwrap_or_else(|_| authority.clone())
}

impl fmt::Debug for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Named(name) => write!(f, "ConnectionKey({name:?})"),
            _ => write!(f, "ConnectionKey({self})"),
        }
    }
}

/// The origin (`https://crm.example`), lowercase, or the name a
/// [`ConnectionKey::new`] key was given: what the metrics' `connection`
/// label shows.
impl fmt::Display for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Named(name) => f.write_str(name),
            Repr::Origin(Some(scheme), authority) => write!(f, "{scheme}://{authority}"),
            Repr::Origin(None, authority) => write!(f, "{authority}"),
            Repr::NoAuthority => f.write_str("<no authority>"),
            Repr::Inline(origin) => match origin.scheme {
                InlineScheme::None => f.write_str(origin.authority()),
                InlineScheme::Http => write!(f, "http://{}", origin.authority()),
                InlineScheme::Https => write!(f, "https://{}", origin.authority()),
            },
        }
    }
}

/// How a rate limiter finds a request's key from its head (method, URI,
/// headers, extensions).
///
/// Implemented by [`ByConnection`] and by any `Fn(&http::request::Parts) -> K`.
/// It reads the head, not the whole `Request<B>`, so that the key type is
/// fixed when the layer is built, before any body type is known.
pub trait KeyOf {
    /// The key: one bucket per distinct value.
    type Key: Hash + Eq + Clone + Send + Sync + fmt::Debug + 'static;

    /// The key of the request whose head is `head`.
    fn key_of(&self, head: &Parts) -> Self::Key;
}

/// The default key: the request's [`ConnectionKey`] extension, or else its
/// URI's scheme and authority.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByConnection;

impl KeyOf for ByConnection {
    type Key = ConnectionKey;

    fn key_of(&self, head: &Parts) -> ConnectionKey {
        match head.extensions.get::<ConnectionKey>() {
            Some(key) => key.clone(),
            None => ConnectionKey::of_uri(&head.uri),
        }
    }
}

impl<F, K> KeyOf for F
where
    F: Fn(&Parts) -> K,
    K: Hash + Eq + Clone + Send + Sync + fmt::Debug + 'static,
{
    type Key = K;

    fn key_of(&self, head: &Parts) -> K {
        self(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(uri: &str) -> ConnectionKey {
        ByConnection.key_of(&head(uri))
    }

    fn head(uri: &str) -> Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn extension_wins_over_authority() {
        let mut parts = head("http://a.example/x");
        parts.extensions.insert(ConnectionKey::new("conn-1"));
        assert_eq!(ByConnection.key_of(&parts), ConnectionKey::new("conn-1"));
    }

    #[test]
    fn authority_fallback() {
        assert_eq!(key_of("http://a.example/x"), key_of("http://a.example/y?z"));
        assert_eq!(key_of("http://A.example/x"), key_of("http://a.example/x"));
        let state = std::hash::RandomState::new();
        let hash_in = |uri| std::hash::BuildHasher::hash_one(&state, key_of(uri));
        assert_eq!(
            hash_in("http://A.Example:8080/x"),
            hash_in("http://a.example:8080/y")
        );
        assert_ne!(hash_in("http://a.example/"), hash_in("http://b.example/"));
        // Authorities too long to keep inline, and other schemes, still
        // key by origin.
        let long = "a-host-name-far-too-long-to-keep-inline.example";
        assert_eq!(
            key_of(&format!("http://{long}/x")),
            key_of(&format!("http://{}/y", long.to_ascii_uppercase()))
        );
        assert_ne!(
            key_of(&format!("http://{long}/")),
            key_of(&format!("https://{long}/"))
        );
        assert_eq!(
            format!("{:?}", key_of(&format!("https://{long}:8443/"))),
            format!("ConnectionKey(https://{long}:8443)")
        );
        assert_eq!(key_of("ftp://a.example/x"), key_of("ftp://A.example/y"));
        assert_ne!(key_of("ftp://a.example/"), key_of("http://a.example/"));
        assert_eq!(
            format!("{:?}", key_of("https://a.example/")),
            "ConnectionKey(https://a.example)"
        );
        assert_eq!(
            std::mem::size_of::<ConnectionKey>(),
            48,
            "the inline form must not grow the key (per-key memory)"
        );
        assert_ne!(key_of("http://a.example/"), key_of("http://b.example/"));
        assert_ne!(key_of("http://a.example/"), key_of("https://a.example/"));
        assert_ne!(
            key_of("http://a.example/"),
            key_of("http://a.example:8080/")
        );
        assert_eq!(key_of("/relative"), key_of("/other"));
        assert_eq!(
            format!("{:?}", key_of("http://a.example:8080/")),
            "ConnectionKey(http://a.example:8080)"
        );
    }
}
