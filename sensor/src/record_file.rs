//! Writing the files the sensor keeps as root (history, blocked, hosts.deny) without being
//! turned against the host: never through a symbolic link, never in a world-writable directory.
//!
//! Whoever can write a directory can swap a record file for a link to `/etc/shadow` between
//! two alarms; root then appends to the link's target. So the last component is opened with
//! `O_NOFOLLOW`, the parent directory must not be world-writable (sticky bit or not: a sticky
//! `/tmp` still lets anyone create the name first), and the file opened must be a regular one.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::{errno::Errno, fcntl::OFlag};

use crate::{Error, Result};

/// Appends `line` and a newline to the `what` file at `path`, creating it.
pub fn append_line(path: &Path, what: &'static str, line: &str) -> Result<()> {
    let mut file = open(path, what, false)?;
    writeln!(file, "{line}").map_err(|source| write_error(path, what, source))
}

/// Replaces the content of the `what` file at `path` with `text`, creating it.
pub fn replace(path: &Path, what: &'static str, text: &str) -> Result<()> {
    let mut file = open(path, what, true)?;
    file.write_all(text.as_bytes())
        .map_err(|source| write_error(path, what, source))
}

fn open(path: &Path, what: &'static str, truncate: bool) -> Result<File> {
    let unsafe_record = |reason: String| Error::UnsafeRecord {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let parent = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let dir = std::fs::metadata(parent).map_err(|source| write_error(path, what, source))?;
    if dir.permissions().mode() & 0o002 != 0 {
        return Err(unsafe_record(format!(
            "its directory {} is world-writable (mode {:o})",
            parent.display(),
            dir.permissions().mode() & 0o7777
        )));
    }
    let mut options = OpenOptions::new();
    options
        .create(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits() | OFlag::O_NONBLOCK.bits());
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    let file = options.open(path).map_err(|source| {
        if source.raw_os_error() == Some(Errno::ELOOP as i32) {
            unsafe_record("it is a symbolic link, which the sensor does not follow".into())
        } else {
            write_error(path, what, source)
        }
    })?;
    let kind = file
        .metadata()
        .map_err(|source| write_error(path, what, source))?;
    if !kind.is_file() {
        return Err(unsafe_record("it is not a regular file".into()));
    }
    Ok(file)
}

fn write_error(path: &Path, what: &'static str, source: io::Error) -> Error {
    Error::WriteRecord {
        what,
        path: PathBuf::from(path),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        dir
    }

    #[test]
    fn a_regular_file_is_appended_to() {
        let dir = private_dir();
        let path = dir.path().join("history");
        append_line(&path, "history", "one").expect("append");
        append_line(&path, "history", "two").expect("append");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "one\ntwo\n");
    }

    #[test]
    fn a_regular_file_is_replaced() {
        let dir = private_dir();
        let path = dir.path().join("blocked");
        std::fs::write(&path, "old line\n").expect("write");
        replace(&path, "blocked", "new\n").expect("replace");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new\n");
    }

    #[test]
    fn a_symbolic_link_is_refused_and_its_target_left_alone() {
        let dir = private_dir();
        let target = dir.path().join("shadow");
        std::fs::write(&target, "root:x:0\n").expect("write");
        let link = dir.path().join("history");
        symlink(&target, &link).expect("symlink");
        let error = append_line(&link, "history", "pwned").expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("history file"), "{message}");
        assert!(message.contains(&link.display().to_string()), "{message}");
        assert!(message.contains("symbolic link"), "{message}");
        assert!(replace(&link, "blocked", "").is_err());
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "root:x:0\n"
        );
    }

    #[test]
    fn a_file_in_a_world_writable_directory_is_refused() {
        let dir = private_dir();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let path = shared.join("hosts.deny");
        let message = append_line(&path, "hosts.deny", "ALL: 203.0.113.7")
            .expect_err("refused")
            .to_string();
        assert!(message.contains("hosts.deny file"), "{message}");
        assert!(message.contains("world-writable"), "{message}");
        assert!(!path.exists());
    }

    #[test]
    fn a_sticky_world_writable_directory_is_refused_too() {
        let dir = private_dir();
        let sticky = dir.path().join("tmp");
        std::fs::create_dir(&sticky).expect("mkdir");
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        assert!(append_line(&sticky.join("history"), "history", "x").is_err());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = private_dir();
        let path = dir.path().join("blocked");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let message = replace(&path, "blocked", "x")
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains("not a regular file") || message.contains("cannot write"),
            "{message}"
        );
    }
}
