//! Finding VMMs on a host: by convention every VMM's API socket is
//! `NAME.sock` in one directory (`/run/vmm`, or `$VMM_SOCKET_DIR`).
//! `vmmctl list` and `vmm-web` both find VMMs through here.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The environment variable naming the socket directory.
pub const SOCKET_DIR_ENV: &str = "VMM_SOCKET_DIR";
/// Where VMM API sockets live by convention.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vmm";

/// `$VMM_SOCKET_DIR` if set and not empty, else `/run/vmm`.
pub fn socket_dir() -> PathBuf {
    std::env::var_os(SOCKET_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR), PathBuf::from)
}

/// The `*.sock` sockets in `dir` as (name without `.sock`, path), sorted by
/// name. A missing directory has none; other files are ignored.
pub fn find_vmm_sockets(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
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
    fn only_named_sockets_are_found_in_name_order() {
        let dir = std::env::temp_dir().join(format!("api-discovery-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let _b = std::os::unix::net::UnixListener::bind(dir.join("b.sock")).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(dir.join("a.sock")).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(dir.join("c.console")).unwrap();
        let _bare = std::os::unix::net::UnixListener::bind(dir.join(".sock")).unwrap();
        std::fs::write(dir.join("file.sock"), b"not a socket").unwrap();
        let found = find_vmm_sockets(&dir).unwrap();
        assert_eq!(
            found,
            vec![
                ("a".to_string(), dir.join("a.sock")),
                ("b".to_string(), dir.join("b.sock")),
            ]
        );
        assert!(find_vmm_sockets(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
