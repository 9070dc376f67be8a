//! Finding the VMMs of a host: the socket-directory convention. Every VMM
//! serves its API on `DIR/NAME.sock`, DIR being `$VMM_SOCKET_DIR` or
//! `/run/vmm`. `vmmctl list` and `vmm-overcommit` find VMMs this way.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The environment variable naming the socket directory.
pub const SOCKET_DIR_ENV: &str = "VMM_SOCKET_DIR";
/// Where VMM API sockets live by convention.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vmm";

/// The socket directory: `$VMM_SOCKET_DIR`, else the convention's.
pub fn socket_dir() -> PathBuf {
    std::env::var_os(SOCKET_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR), PathBuf::from)
}

/// `(NAME, path)` of every socket `NAME.sock` in `dir`, sorted by name. A
/// missing directory has none. Whether a VMM answers on each is for the
/// caller to find out.
pub fn vmm_sockets(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut sockets: Vec<(String, PathBuf)> = read
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| {
            let path = e.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".sock")?
                .to_string();
            (!name.is_empty()).then_some((name, path))
        })
        .collect();
    sockets.sort();
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sockets_named_dot_sock_are_found() {
        let dir = std::env::temp_dir().join(format!("vmm-discover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let _b = std::os::unix::net::UnixListener::bind(dir.join("b.sock")).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(dir.join("a.sock")).unwrap();
        let _c = std::os::unix::net::UnixListener::bind(dir.join("a.console")).unwrap();
        std::fs::write(dir.join("file.sock"), "").unwrap();
        let found: Vec<String> = vmm_sockets(&dir)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(found, ["a", "b"]);
        assert!(vmm_sockets(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
