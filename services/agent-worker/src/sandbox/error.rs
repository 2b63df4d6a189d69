//! The sandbox's one error type. Every message is read by the model that made the call, so it
//! says what was refused and why, in terms of the paths and names the model gave.

use std::io;

/// Why a sandbox operation was refused or failed. None of these is a crash: the tool layer
/// hands the display form to the model, which can correct the call and try again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A workspace name that could not be a single directory name.
    #[error("workspace name {name:?} refused: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A path that cannot be resolved at all (a NUL byte, `~user`).
    #[error("path {path:?} refused: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// A path that resolves outside the workspace (absolute elsewhere, or `..` past its root).
    #[error(
        "path {path:?} is outside the workspace; only paths inside it are allowed (relative \
         paths start at the workspace)"
    )]
    OutsideWorkspace { path: String },
    /// A path that is inside the workspace as written but goes through a symbolic link that
    /// leads out of it, or through one that cannot be followed (dangling, looping).
    #[error(
        "path {path:?} goes through a symbolic link that leads outside the workspace or cannot \
         be followed; refused"
    )]
    SymlinkEscape { path: String },
    #[error("path {path:?} does not exist")]
    NotFound { path: String },
    #[error("path {path:?} is a directory, not a file")]
    IsADirectory { path: String },
    #[error("path {path:?} is not a directory")]
    NotADirectory { path: String },
    /// A FIFO, socket or device: reading or writing it could block or reach outside.
    #[error("path {path:?} is not a regular file")]
    NotAFile { path: String },
    /// Content over the write limit.
    #[error(
        "content of {size} bytes is over the limit of {limit} bytes per file; nothing was written"
    )]
    TooLarge { size: u64, limit: u64 },
    /// A bare program name that is on none of the sandbox PATH's directories.
    #[error("program {program:?} was not found on the sandbox's PATH")]
    UnknownProgram { program: String },
    /// A command's program, working directory or argument that failed a path check.
    #[error("{what} refused: {reason}")]
    Refused { what: String, reason: Box<Error> },
    /// Resource limits are configured, but the `prlimit` tool that applies them is missing.
    #[error(
        "resource limits are configured but `prlimit` (util-linux) was not found; the command \
         was not run"
    )]
    LimitsUnavailable,
    /// The operating system refused to start the program.
    #[error("could not start {program:?}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{path:?}: {source}")]
    Io { path: String, source: io::Error },
}

impl Error {
    /// A short, stable name for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidName { .. } => "invalid_name",
            Error::InvalidPath { .. } => "invalid_path",
            Error::OutsideWorkspace { .. } => "outside_workspace",
            Error::SymlinkEscape { .. } => "symlink_escape",
            Error::NotFound { .. } => "not_found",
            Error::IsADirectory { .. } => "is_a_directory",
            Error::NotADirectory { .. } => "not_a_directory",
            Error::NotAFile { .. } => "not_a_file",
            Error::TooLarge { .. } => "too_large",
            Error::UnknownProgram { .. } => "unknown_program",
            Error::Refused { reason, .. } => reason.code(),
            Error::LimitsUnavailable => "limits_unavailable",
            Error::Spawn { .. } => "spawn",
            Error::Io { .. } => "io",
        }
    }

    /// Wraps a path error with what it was checked for (`argument "--out=/etc/x"`).
    pub(crate) fn refused(what: impl Into<String>, reason: Error) -> Self {
        Error::Refused {
            what: what.into(),
            reason: Box::new(reason),
        }
    }

    /// Maps an I/O error on the model's `path` to the variant that explains it best.
    pub(crate) fn io(path: &str, source: io::Error) -> Self {
        let path = path.to_owned();
        match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound { path },
            io::ErrorKind::IsADirectory => Error::IsADirectory { path },
            io::ErrorKind::NotADirectory => Error::NotADirectory { path },
            // O_NOFOLLOW met a symbolic link that appeared after the path was checked.
            _ if source.raw_os_error() == Some(nix::libc::ELOOP) => Error::SymlinkEscape { path },
            _ => Error::Io { path, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_was_refused_and_why() {
        let error = Error::refused(
            "argument \"--out=/etc/x\"",
            Error::OutsideWorkspace {
                path: "/etc/x".into(),
            },
        );
        assert_eq!(
            error.to_string(),
            "argument \"--out=/etc/x\" refused: path \"/etc/x\" is outside the workspace; only \
             paths inside it are allowed (relative paths start at the workspace)"
        );
        assert_eq!(error.code(), "outside_workspace");
        let error = Error::io("a.txt", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(error.to_string(), "path \"a.txt\" does not exist");
        let error = Error::io("link", io::Error::from_raw_os_error(nix::libc::ELOOP));
        assert_eq!(error.code(), "symlink_escape");
    }
}
