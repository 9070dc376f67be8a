//! Binding the Unix sockets a VMM listens on (its API, its console, an
//! incoming migration): one helper, so that every path follows the same two
//! rules.
//!
//! - A path never destroys a file it does not own: only a socket that no
//!   process serves (connecting is refused) is replaced; a regular file, a
//!   directory or a live socket at the path is an error naming it, and
//!   nothing is deleted.
//! - The socket is private from its first connection: it is chmod-ed to 0600
//!   (0660 and chown-ed to a group, when one is given) between `bind` and
//!   `listen`, so whatever the umask, nobody else can ever connect (before
//!   `listen`, every connect is refused).

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use config::ErrorClass;

/// How many connections may wait to be accepted.
const BACKLOG: libc::c_int = 1024;

/// Why a socket could not be bound. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{}: exists and is not a socket; not replacing it", .path.display())]
    NotASocket { path: PathBuf },
    #[error("{}: is in use by another process (a running VMM?)", .path.display())]
    InUse { path: PathBuf },
    #[error("{}: no group named {group:?} on this host", .path.display())]
    UnknownGroup { path: PathBuf, group: String },
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SocketError {
    /// A file in the way or a bad group is the caller's mistake; a live
    /// socket belongs to someone else (a conflict).
    pub fn class(&self) -> ErrorClass {
        match self {
            SocketError::NotASocket { .. } | SocketError::UnknownGroup { .. } => ErrorClass::Caller,
            SocketError::InUse { .. } => ErrorClass::Conflict,
            SocketError::Io { source, .. } => ErrorClass::of_io(source),
        }
    }
}

impl From<SocketError> for io::Error {
    fn from(e: SocketError) -> io::Error {
        let kind = match &e {
            SocketError::NotASocket { .. } => io::ErrorKind::AlreadyExists,
            SocketError::InUse { .. } => io::ErrorKind::AddrInUse,
            SocketError::UnknownGroup { .. } => io::ErrorKind::InvalidInput,
            SocketError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// The socket file a [`bind`] created. Dropping it removes the file, unless
/// it is no longer ours (someone removed it and another process bound the
/// same path since).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time of the socket we bound (an inode
    /// number alone is reused at once on tmpfs).
    identity: Identity,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives up removing the file on drop; the caller removes it.
    pub fn into_path(self) -> PathBuf {
        let path = self.path.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if identity(&self.path) == Some(self.identity) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

type Identity = (u64, u64, i64, i64);

fn identity(path: &Path) -> Option<Identity> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Binds and listens on a Unix stream socket at `path`, mode 0600, or 0660
/// owned by `group` if one is given. A stale socket at `path` is replaced;
/// anything else there is an error and is left alone.
pub fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, SocketFile), SocketError> {
    let io_err = |what: &'static str| {
        move |source: io::Error| SocketError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let gid = group.map(|g| group_id(path, g)).transpose()?;
    let address = socket_address(path).map_err(io_err("cannot bind"))?;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err("cannot create a socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Err(e) = bind_fd(&socket, &address) {
        if e.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(io_err("cannot bind")(e));
        }
        remove_stale(path)?;
        bind_fd(&socket, &address).map_err(io_err("cannot bind"))?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let chmod = fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set the socket's mode"))
        .and_then(|_| match gid {
            Some(gid) => std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io_err("cannot give the socket to its group")),
            None => Ok(()),
        });
    if let Err(e) = chmod {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    // From here on, the file is ours: remove it again on any error.
    let file = SocketFile {
        path: path.to_path_buf(),
        identity: identity(path).ok_or_else(|| {
            io_err("cannot inspect the new socket")(io::Error::from(io::ErrorKind::NotFound))
        })?,
    };
    // SAFETY: socket is a bound stream socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io_err("cannot listen")(io::Error::last_os_error()));
    }
    Ok((UnixListener::from(socket), file))
}

/// Checks, without changing anything, that [`bind`] could take `path`:
/// nothing is there, or a socket no process serves. (So that a bad path is
/// reported when a VM is defined, not only when it boots.)
pub fn check_free(path: &Path) -> Result<(), SocketError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                path: path.to_path_buf(),
                what: "cannot inspect",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes the socket at `path` if no process serves it; anything else
/// there is an error.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let io_err = |what: &'static str| {
        move |source: io::Error| SocketError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let meta = fs::symlink_metadata(path).map_err(io_err("cannot inspect"))?;
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Stale: left by a process that died without cleaning up. Only
            // the socket we looked at goes, not something put there since.
            if identity(path) != Some((meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())) {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                });
            }
            fs::remove_file(path).map_err(io_err("cannot remove the stale socket"))
        }
        Err(e) => Err(io_err("cannot check whether another process serves")(e)),
    }
}

fn socket_address(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be 1 to {} bytes without NUL",
                address.sun_path.len() - 1
            ),
        ));
    }
    for (to, from) in address.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    Ok(address)
}

fn bind_fd(socket: &OwnedFd, address: &libc::sockaddr_un) -> io::Result<()> {
    // SAFETY: address is a valid sockaddr_un of the given size; socket is ours.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (address as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The id of the group named `name` (or given as a number).
fn group_id(path: &Path, name: &str) -> Result<u32, SocketError> {
    let unknown = || SocketError::UnknownGroup {
        path: path.to_path_buf(),
        group: name.to_string(),
    };
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name = CString::new(OsStr::new(name).as_bytes()).map_err(|_| unknown())?;
    // SAFETY: group is plain data filled by getgrnam_r.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(unknown());
    }
    Ok(group.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("api-socket-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sockets_are_private_whatever_the_umask_and_nothing_else_is_replaced() {
        let dir = temp_dir("bind");
        let path = dir.join("s.sock");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let bound = bind(&path, None);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let (listener, file) = bound.unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live socket is not taken.
        assert!(matches!(bind(&path, None), Err(SocketError::InUse { .. })));
        drop(listener);
        // Now stale: replaced.
        let (_listener, file2) = bind(&path, None).unwrap();
        drop(file); // not ours any more: stays
        assert!(path.exists());
        drop(file2);
        assert!(!path.exists());
        // A regular file and a directory stay.
        let image = dir.join("disk.img");
        fs::write(&image, b"precious").unwrap();
        let e = bind(&image, None).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        assert!(e.to_string().contains("disk.img"), "{e}");
        assert_eq!(fs::read(&image).unwrap(), b"precious");
        assert!(matches!(
            bind(&dir, None),
            Err(SocketError::NotASocket { .. })
        ));
        let e = bind(&path, Some("no-such-group-here")).unwrap_err();
        assert!(matches!(e, SocketError::UnknownGroup { .. }), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
