//! The snapshot directory: where `vm.snapshot` writes a VM and `--restore`
//! / `vm.restore` read it back.
//!
//! `DIR/snapshot` is the migration stream of the VM (see
//! [`migration::protocol`]), mode 0600. It is written as
//! `DIR/snapshot.partial` and renamed when complete and synced, so a crash
//! or a full disk never leaves a file that looks like a snapshot (and its
//! checksum would refuse a damaged one anyway). The directory holds guest
//! memory: it is created mode 0700, and an existing one must already be
//! private to the VMM's user (it is never chmod-ed: `/tmp` stays `/tmp`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use config::ErrorClass;

/// The stream's file name in the snapshot directory.
pub const SNAPSHOT_FILE: &str = "snapshot";
const PARTIAL_FILE: &str = "snapshot.partial";

/// Why a snapshot directory cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(
        "{} is mode {mode:04o} and owned by uid {uid}: a snapshot holds guest memory, so its \
         directory must be private to this VMM's user (uid {me}, mode 0700); give a new path \
         and the VMM creates it so",
        dir.display()
    )]
    NotPrivate {
        dir: PathBuf,
        mode: u32,
        uid: u32,
        me: u32,
    },
    #[error("{} holds no snapshot ({} is missing)", dir.display(), SNAPSHOT_FILE)]
    Missing { dir: PathBuf },
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
}

impl SnapshotFileError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SnapshotFileError::Io { source, .. } => ErrorClass::of_io(source),
            _ => ErrorClass::Caller,
        }
    }
}

fn io_error<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(io::Error) -> SnapshotFileError + 'a {
    move |source| SnapshotFileError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// A snapshot being written: the partial file, renamed by [`Self::commit`].
#[derive(Debug)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
    partial: PathBuf,
    path: PathBuf,
}

/// Makes `dir` (0700) if missing, or checks it is private, and creates the
/// partial file (0600) to write the stream to.
pub fn prepare(dir: &Path) -> Result<(SnapshotFiles, File), SnapshotFileError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_error(dir, "cannot create the directory"))?;
            // Whatever the umask left.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error(dir, "cannot make the directory private"))?;
        }
        Err(e) => return Err(io_error(dir, "cannot look at the directory")(e)),
        Ok(meta) if !meta.is_dir() => return Err(SnapshotFileError::NotADirectory(dir.into())),
        Ok(meta) => {
            // SAFETY: geteuid cannot fail and has no side effects.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me || meta.mode() & 0o077 != 0 {
                return Err(SnapshotFileError::NotPrivate {
                    dir: dir.into(),
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    me,
                });
            }
        }
    }
    let files = SnapshotFiles {
        dir: dir.to_path_buf(),
        partial: dir.join(PARTIAL_FILE),
        path: dir.join(SNAPSHOT_FILE),
    };
    // A partial file of an earlier run that died writing.
    match std::fs::remove_file(&files.partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_error(&files.partial, "cannot remove")(e))
        }
        _ => {}
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&files.partial)
        .map_err(io_error(&files.partial, "cannot create"))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_error(&files.partial, "cannot make the file private"))?;
    Ok((files, file))
}

impl SnapshotFiles {
    /// The written and synced partial file becomes the snapshot (replacing
    /// an older one), durably.
    pub fn commit(&self) -> Result<(), SnapshotFileError> {
        std::fs::rename(&self.partial, &self.path).map_err(io_error(
            &self.path,
            "cannot rename the written snapshot to",
        ))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir, "cannot sync the directory"))
    }

    /// Removes the partial file of a failed snapshot.
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// Opens `dir`'s snapshot for reading.
pub fn open(dir: &Path) -> Result<File, SnapshotFileError> {
    let path = dir.join(SNAPSHOT_FILE);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SnapshotFileError::Missing { dir: dir.into() },
            _ => io_error(&path, "cannot open")(e),
        })?;
    let meta = file.metadata().map_err(io_error(&path, "cannot look at"))?;
    if !meta.is_file() {
        return Err(SnapshotFileError::NotAFile(path));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-snapfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_directory_is_private_and_the_file_appears_only_when_committed() {
        let dir = scratch("new");
        let (files, file) = prepare(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(PARTIAL_FILE)), 0o600);
        assert!(matches!(open(&dir), Err(SnapshotFileError::Missing { .. })));
        drop(file);
        files.commit().unwrap();
        assert_eq!(mode(&dir.join(SNAPSHOT_FILE)), 0o600);
        assert!(open(&dir).is_ok());
        // Again into the same (private) directory: replaced.
        let (files, _file) = prepare(&dir).unwrap();
        files.discard();
        assert!(!dir.join(PARTIAL_FILE).exists());
        assert!(open(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_read_is_refused_and_left_alone() {
        let dir = scratch("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare(&dir).unwrap_err();
        assert!(e.to_string().contains("mode 0755"), "{e}");
        assert_eq!(e.class(), ErrorClass::Caller);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o7777,
            0o755,
            "never chmod-ed"
        );
        let file = dir.join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            prepare(&file),
            Err(SnapshotFileError::NotADirectory(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
