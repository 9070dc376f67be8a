//! Who may use the console, and proof that a state-changing request comes
//! from the console's own page.
//!
//! - Authentication (required when serving beyond loopback): a token or
//!   password read from a file. The login form trades it for a session
//!   cookie (`HttpOnly`, `SameSite=Strict`); scripts may send it as
//!   `Authorization: Bearer TOKEN` instead. Failed attempts are rate-limited.
//! - CSRF: every session has a random token that the page reads from
//!   `GET /api/session` (same-origin only) and sends back in the
//!   `X-CSRF-Token` header of every POST; the server compares it. Requests
//!   authenticated by a bearer token carry no cookie a foreign page could
//!   ride on, so they need none.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{WebError, WebResult};

pub const SESSION_COOKIE: &str = "vmmweb_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at most; the least recently used goes first.
pub const MAX_SESSIONS: usize = 512;
/// A session unused this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Failed logins allowed per minute (all clients together).
pub const MAX_FAILURES_PER_MINUTE: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("--auth-token-file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--auth-token-file {}: the file is empty (its first line is the token)", path.display())]
    Empty { path: PathBuf },
    #[error("--auth-token-file {}: every user can read it (mode {mode:o}); chmod o-rwx it", path.display())]
    WorldReadable { path: PathBuf, mode: u32 },
}

/// The secret in `path`: its first line, without the line end. The file
/// must not be readable by every user.
pub fn load_secret(path: &Path) -> Result<Vec<u8>, AuthFileError> {
    let read_error = |source| AuthFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(AuthFileError::WorldReadable {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let mut text = Vec::new();
    file.by_ref()
        .take(64 * 1024)
        .read_to_end(&mut text)
        .map_err(read_error)?;
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(AuthFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(line.to_vec())
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> WebResult<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| WebError::Internal(format!("cannot read /dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Clone, Debug)]
pub struct Session {
    pub csrf: String,
    last_seen: Instant,
}

pub struct Auth {
    secret: Option<Vec<u8>>,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<VecDeque<Instant>>,
}

impl Auth {
    /// `secret`: the token logins must present; None when anyone who can
    /// connect may use the console (loopback or a Unix socket).
    pub fn new(secret: Option<Vec<u8>>) -> Auth {
        Auth {
            secret,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(VecDeque::new()),
        }
    }

    pub fn required(&self) -> bool {
        self.secret.is_some()
    }

    /// Checks a presented token; failures count against the rate limit,
    /// and once over it even a right token is refused for a while.
    pub fn check_token(&self, given: &[u8]) -> WebResult<()> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            failures.pop_front();
        }
        if failures.len() >= MAX_FAILURES_PER_MINUTE {
            return Err(WebError::TooManyFailures);
        }
        if constant_time_eq(given, secret) {
            Ok(())
        } else {
            failures.push_back(now);
            Err(WebError::WrongToken)
        }
    }

    /// A new session: its id (the cookie) and CSRF token.
    pub fn new_session(&self) -> WebResult<(String, Session)> {
        let id = random_hex(32)?;
        let session = Session {
            csrf: random_hex(32)?,
            last_seen: Instant::now(),
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| now.duration_since(s.last_seen) < SESSION_IDLE);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(id, _)| id.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The live session with this id (and marks it used).
    pub fn session(&self, id: &str) -> Option<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let session = sessions.get_mut(id)?;
        if now.duration_since(session.last_seen) >= SESSION_IDLE {
            sessions.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    pub fn end_session(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// The `Set-Cookie` value for a session.
pub fn session_cookie(id: &str) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_IDLE.as_secs()
    )
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn expired_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_must_be_private_and_not_empty() {
        let dir = std::env::temp_dir().join(format!("web-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\r\nsecond line\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(load_secret(&file).unwrap(), b"s3cret");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_secret(&file).unwrap_err().to_string();
        assert!(e.contains("every user can read it (mode 644)"), "{e}");
        std::fs::write(dir.join("empty"), "\n").unwrap();
        std::fs::set_permissions(dir.join("empty"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert!(matches!(
            load_secret(&dir.join("empty")),
            Err(AuthFileError::Empty { .. })
        ));
        assert!(matches!(
            load_secret(&dir.join("missing")),
            Err(AuthFileError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_tokens_are_refused_and_rate_limited() {
        let auth = Auth::new(Some(b"right-token".to_vec()));
        assert!(auth.check_token(b"right-token").is_ok());
        assert!(!constant_time_eq(b"right-token", b"right-toke"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert!(matches!(
                auth.check_token(b"guess"),
                Err(WebError::WrongToken)
            ));
        }
        // Over the limit, even the right token waits.
        assert!(matches!(
            auth.check_token(b"right-token"),
            Err(WebError::TooManyFailures)
        ));
        assert!(Auth::new(None).check_token(b"anything").is_ok());
    }

    #[test]
    fn sessions_have_their_own_csrf_tokens_and_end() {
        let auth = Auth::new(None);
        let (a, sa) = auth.new_session().unwrap();
        let (b, sb) = auth.new_session().unwrap();
        assert_ne!(a, b);
        assert_ne!(sa.csrf, sb.csrf);
        assert_eq!(a.len(), 64);
        assert_eq!(auth.session(&a).unwrap().csrf, sa.csrf);
        auth.end_session(&a);
        assert!(auth.session(&a).is_none());
        assert!(auth.session("forged").is_none());
        assert_eq!(
            cookie("x=1; vmmweb_session=abc; y=2", SESSION_COOKIE),
            Some("abc")
        );
        assert_eq!(cookie("x=1", SESSION_COOKIE), None);
    }

    #[test]
    fn the_session_store_is_bounded() {
        let auth = Auth::new(None);
        let (first, _) = auth.new_session().unwrap();
        for _ in 0..MAX_SESSIONS {
            auth.new_session().unwrap();
        }
        assert!(auth.session(&first).is_none());
        assert!(auth.sessions.lock().unwrap().len() <= MAX_SESSIONS);
    }
}
