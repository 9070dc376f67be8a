//! Dropping root for a named user (`vmm --user NAME`).
//!
//! The VMM opens what needs privileges first (/dev/kvm, disks, taps,
//! sockets), then becomes the user: its supplementary groups, its primary
//! group, its uid (real, effective and saved). With every uid non-zero the
//! kernel clears the permitted, effective and ambient capabilities, and
//! no-new-privileges (set before any thread starts, so every thread has it)
//! keeps a later exec from gaining any. Credentials are per thread in Linux;
//! glibc's setgroups/setresgid/setresuid change them in every thread of the
//! process (which is why the seccomp lists allow those calls when `--user`
//! is given).

use std::ffi::{CStr, CString};
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no such user {0:?}")]
    NoSuchUser(String),
    #[error("cannot look up user {name:?}: {source}")]
    Lookup { name: String, source: io::Error },
    #[error("cannot {what}: {source}")]
    Call {
        what: &'static str,
        source: io::Error,
    },
    #[error("still has capabilities after the change (CapEff {0:#x})")]
    Capabilities(u64),
}

/// A user to run as, looked up when the command line is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl User {
    /// Looks up `name` (a user name or a numeric uid) in the user database,
    /// with its primary group and the groups it belongs to.
    pub fn lookup(name: &str) -> Result<User, UserError> {
        let lookup_err = |source| UserError::Lookup {
            name: name.to_string(),
            source,
        };
        let c_name = CString::new(name).map_err(|_| UserError::NoSuchUser(name.to_string()))?;
        // SAFETY: passwd is plain data; getpwnam_r/getpwuid_r fill it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = match name.parse::<libc::uid_t>() {
            // SAFETY: all pointers are valid for the call, buf.len() is its size.
            Ok(uid) => unsafe {
                libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result)
            },
            // SAFETY: as above, with a NUL-terminated name.
            Err(_) => unsafe {
                libc::getpwnam_r(
                    c_name.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            },
        };
        if rc != 0 {
            return Err(lookup_err(io::Error::from_raw_os_error(rc)));
        }
        if result.is_null() {
            return Err(UserError::NoSuchUser(name.to_string()));
        }
        // SAFETY: pw_name points into `buf`, NUL-terminated, while buf lives.
        let user_name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned();
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut count = groups.len() as libc::c_int;
        // SAFETY: user_name is NUL-terminated; groups has room for `count`.
        let rc = unsafe {
            libc::getgrouplist(
                user_name.as_ptr(),
                pwd.pw_gid,
                groups.as_mut_ptr(),
                &mut count,
            )
        };
        if rc < 0 {
            return Err(lookup_err(io::Error::other(
                "the user is in more than 256 groups",
            )));
        }
        groups.truncate(count.max(0) as usize);
        Ok(User {
            name: user_name.to_string_lossy().into_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uid(&self) -> libc::uid_t {
        self.uid
    }

    pub fn gid(&self) -> libc::gid_t {
        self.gid
    }

    /// Turns the whole process into this user, for good, and checks that
    /// no capability is left.
    pub fn become_it(&self) -> Result<(), UserError> {
        let call = |what, rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(UserError::Call {
                    what,
                    source: io::Error::last_os_error(),
                })
            }
        };
        // SAFETY: groups is a valid array of groups.len() gids.
        call("set the supplementary groups", unsafe {
            libc::setgroups(self.groups.len(), self.groups.as_ptr())
        })?;
        // SAFETY: plain ids.
        call("set the group", unsafe {
            libc::setresgid(self.gid, self.gid, self.gid)
        })?;
        // SAFETY: plain ids.
        call("set the user", unsafe {
            libc::setresuid(self.uid, self.uid, self.uid)
        })?;
        let caps = effective_capabilities().map_err(|source| UserError::Call {
            what: "read /proc/self/status",
            source,
        })?;
        if caps != 0 && self.uid != 0 {
            return Err(UserError::Capabilities(caps));
        }
        Ok(())
    }
}

/// Sets no-new-privileges on the calling thread (inherited by the threads
/// it starts later): no exec can gain privileges after this.
pub fn no_new_privileges() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's effective capabilities, from /proc/thread-self/status.
fn effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_nobody_are_found_by_name_and_uid() {
        let root = User::lookup("root").unwrap();
        assert_eq!((root.uid(), root.gid()), (0, 0));
        assert_eq!(User::lookup("0").unwrap().name(), "root");
        assert!(matches!(
            User::lookup("no-such-user-here"),
            Err(UserError::NoSuchUser(_))
        ));
    }
}
