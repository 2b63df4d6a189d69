//! A per-task workspace directory: where a task's commands run and the only place its paths
//! may point. Path resolution follows symbolic links the way the kernel would and refuses any
//! path whose real location is outside the workspace.

use std::fs;
use std::io::Read as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Component, Path, PathBuf};

use super::Error;

/// Longest workspace name accepted: it is one directory name.
const MAX_NAME_LEN: usize = 128;

/// `open(2)` flags for every file the sandbox opens for the model. `O_NOFOLLOW`: a symbolic
/// link swapped in after the path was checked is refused rather than followed. `O_NONBLOCK`:
/// opening a FIFO does not wait for its other end (the file type is checked right after).
const OPEN_FLAGS: i32 = nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK;

/// One task's workspace: a directory under the configured root, held by its canonical path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    root: PathBuf,
}

/// What [`Workspace::read_file`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContent {
    /// The first `max_bytes` of the file, decoded as UTF-8 (invalid sequences become U+FFFD; a
    /// character cut by the limit is left out).
    pub text: String,
    /// Whether the file holds more than `text`.
    pub truncated: bool,
    /// The file's size.
    pub total_bytes: u64,
}

impl Workspace {
    /// Makes `<root>/<name>` (mode 0700) if it is missing, or takes the existing directory, so
    /// a task's later calls share one workspace. `root` is created if needed. `name` must be
    /// one plain directory name: 1 to 128 of `[A-Za-z0-9_.-]`, not starting with `.`; names
    /// are refused rather than rewritten, so two tasks never share a directory by accident.
    pub fn create(root: &Path, name: &str) -> Result<Self, Error> {
        check_name(name)?;
        let root_text = root.display().to_string();
        fs::create_dir_all(root).map_err(|source| Error::io(&root_text, source))?;
        let base = root
            .canonicalize()
            .map_err(|source| Error::io(&root_text, source))?;
        let dir = base.join(name);
        let dir_text = dir.display().to_string();
        match fs::symlink_metadata(&dir) {
            // `symlink_metadata` does not follow links: a link named like the workspace is
            // not a directory here.
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(Error::InvalidName {
                    name: name.to_owned(),
                    reason: "something that is not a directory already has that name",
                });
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(0o700).create(&dir) {
                    Ok(()) => {}
                    // Another call for the same task made it meanwhile.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(Error::io(&dir_text, source)),
                }
            }
            Err(source) => return Err(Error::io(&dir_text, source)),
        }
        let root = dir
            .canonicalize()
            .map_err(|source| Error::io(&dir_text, source))?;
        if root.parent() != Some(base.as_path()) {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason: "it does not name a directory directly under the workspace root",
            });
        }
        Ok(Self { root })
    }

    /// The workspace's canonical path. Commands get it as `HOME` and default working directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `path` really is, if that is inside the workspace. Relative paths start at the
    /// workspace, `~` and `~/…` name the workspace (it is `HOME`), absolute paths must lead
    /// into it. Symbolic links are followed as the kernel would follow them; any path whose
    /// real location is outside the workspace is refused, as is one through a link that cannot
    /// be followed. Paths that do not exist yet are fine below a directory that does (their
    /// missing part holds no links), so a file about to be written resolves.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, Error> {
        self.resolve_from(&self.root, path)
    }

    /// [`Workspace::resolve`] with relative paths starting at `base`, a directory inside the
    /// workspace (a command's working directory).
    pub(crate) fn resolve_from(&self, base: &Path, path: &str) -> Result<PathBuf, Error> {
        let invalid = |reason| Error::InvalidPath {
            path: path.to_owned(),
            reason,
        };
        if path.contains('\0') {
            return Err(invalid("it contains a NUL byte"));
        }
        let candidate = if path == "~" {
            self.root.clone()
        } else if let Some(rest) = path.strip_prefix("~/") {
            self.root.join(rest)
        } else if path.starts_with('~') {
            return Err(invalid(
                "`~user` paths are not supported (`~` is the workspace)",
            ));
        } else {
            // `join` keeps an absolute `path` as it is.
            base.join(path)
        };

        // The longest leading part the kernel can resolve, resolved by it (links, `..`).
        let mut existing = candidate.as_path();
        let real_prefix = loop {
            match existing.canonicalize() {
                Ok(real) => break real,
                Err(_) => match existing.parent() {
                    Some(parent) => existing = parent,
                    None => return Err(Error::OutsideWorkspace { path: path.into() }),
                },
            }
        };
        // The rest does not resolve. A part of it that is nevertheless there is a link the
        // kernel could not follow (dangling or looping): writing through a dangling link would
        // create its target wherever it points, so it is refused.
        let rest = candidate.strip_prefix(existing).unwrap_or(Path::new(""));
        let mut resolved = real_prefix;
        let mut probe = existing.to_path_buf();
        for component in rest.components() {
            match component {
                Component::Normal(name) => {
                    probe.push(name);
                    if fs::symlink_metadata(&probe).is_ok_and(|meta| meta.file_type().is_symlink())
                    {
                        return Err(Error::SymlinkEscape { path: path.into() });
                    }
                    resolved.push(name);
                }
                // After a part that does not exist: undo it by name (there is no link to
                // follow back).
                Component::ParentDir => {
                    probe.push("..");
                    resolved.pop();
                }
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        if resolved.starts_with(&self.root) {
            Ok(resolved)
        } else if lexically_normal(&candidate).starts_with(&self.root) {
            Err(Error::SymlinkEscape { path: path.into() })
        } else {
            Err(Error::OutsideWorkspace { path: path.into() })
        }
    }

    /// Reads at most `max_bytes` of the file at `path`. Blocking, but bounded: call it where a
    /// short file read may block the thread.
    pub fn read_file(&self, path: &str, max_bytes: u64) -> Result<FileContent, Error> {
        let real = self.resolve(path)?;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(OPEN_FLAGS)
            .open(&real)
            .map_err(|source| Error::io(path, source))?;
        let meta = file.metadata().map_err(|source| Error::io(path, source))?;
        check_regular_file(path, &meta)?;
        let total_bytes = meta.len();
        let capacity = usize::try_from(total_bytes.min(max_bytes)).unwrap_or(0);
        let mut bytes = Vec::with_capacity(capacity);
        (&mut file)
            .take(max_bytes)
            .read_to_end(&mut bytes)
            .map_err(|source| Error::io(path, source))?;
        let total_bytes = total_bytes.max(bytes.len() as u64);
        let truncated = total_bytes > bytes.len() as u64;
        if truncated {
            bytes.truncate(complete_utf8_len(&bytes));
        }
        Ok(FileContent {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            truncated,
            total_bytes,
        })
    }

    /// Writes `content` to the file at `path`, replacing it, and makes its missing parent
    /// directories. Content over `max_bytes` is refused whole. Blocking, like
    /// [`Workspace::read_file`].
    pub fn write_file(&self, path: &str, content: &[u8], max_bytes: u64) -> Result<(), Error> {
        let size = content.len() as u64;
        if size > max_bytes {
            return Err(Error::TooLarge {
                size,
                limit: max_bytes,
            });
        }
        let real = self.resolve(path)?;
        if real == self.root {
            return Err(Error::IsADirectory { path: path.into() });
        }
        if let Some(parent) = real.parent() {
            // Inside the workspace: `real` is, and its missing part holds no links.
            fs::create_dir_all(parent).map_err(|source| Error::io(path, source))?;
        }
        // Not truncated at open: the type is checked first, so a FIFO or device is refused
        // untouched.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(OPEN_FLAGS)
            .open(&real)
            .map_err(|source| Error::io(path, source))?;
        let meta = file.metadata().map_err(|source| Error::io(path, source))?;
        check_regular_file(path, &meta)?;
        file.set_len(0).map_err(|source| Error::io(path, source))?;
        file.write_all(content)
            .map_err(|source| Error::io(path, source))?;
        Ok(())
    }

    /// Deletes the workspace and everything in it. Symbolic links inside are removed, never
    /// followed.
    pub fn remove(self) -> Result<(), Error> {
        fs::remove_dir_all(&self.root)
            .map_err(|source| Error::io(&self.root.display().to_string(), source))
    }

    /// Deletes the workspace `<root>/<name>` if there is one (a directory, not a link);
    /// returns whether there was.
    pub fn remove_named(root: &Path, name: &str) -> Result<bool, Error> {
        check_name(name)?;
        let dir = root.join(name);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_dir() => fs::remove_dir_all(&dir)
                .map(|()| true)
                .map_err(|source| Error::io(&dir.display().to_string(), source)),
            Ok(_) => Ok(false),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::io(&dir.display().to_string(), source)),
        }
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let refuse = |reason| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return refuse("it must be 1 to 128 characters long");
    }
    if name.starts_with('.') {
        return refuse("it must not start with '.'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return refuse("it may hold only letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

fn check_regular_file(path: &str, meta: &fs::Metadata) -> Result<(), Error> {
    if meta.is_dir() {
        Err(Error::IsADirectory { path: path.into() })
    } else if meta.is_file() {
        Ok(())
    } else {
        Err(Error::NotAFile { path: path.into() })
    }
}

/// `path` with `.` dropped and each `..` taking back the part before it, by name only.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

/// How many leading bytes of `bytes` end on a character boundary when a limit may have cut
/// the last character short.
pub(crate) fn complete_utf8_len(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        // `error_len() == None`: the input ended inside a character.
        Err(error) if error.error_len().is_none() => error.valid_up_to(),
        Err(_) => {
            // Invalid earlier on (decoded lossily anyway); only drop an incomplete tail.
            let start = bytes
                .iter()
                .rposition(|byte| byte & 0b1100_0000 != 0b1000_0000)
                .unwrap_or(0);
            match std::str::from_utf8(&bytes[start..]) {
                Err(error) if error.error_len().is_none() => start,
                _ => bytes.len(),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A unique directory under the system temp dir, deleted when dropped.
    pub(crate) struct TempRoot(pub PathBuf);

    impl TempRoot {
        pub(crate) fn new(label: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "colony-sandbox-{label}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A workspace `task` under a fresh root, and a directory `outside` next to it.
    fn setup(label: &str) -> (TempRoot, Workspace, PathBuf) {
        let temp = TempRoot::new(label);
        let workspace = Workspace::create(&temp.0.join("workspaces"), "task").unwrap();
        let outside = temp.0.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret.txt"), "top secret").unwrap();
        (temp, workspace, outside)
    }

    #[test]
    fn names_that_are_not_one_plain_directory_name_are_refused() {
        let temp = TempRoot::new("names");
        for name in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a\0b",
            "a b",
            &"x".repeat(129),
        ] {
            let error = Workspace::create(&temp.0, name).unwrap_err();
            assert!(
                matches!(error, Error::InvalidName { .. }),
                "{name:?}: {error}"
            );
        }
        let workspace = Workspace::create(&temp.0, "run-1.task_2").unwrap();
        assert_eq!(
            workspace.root(),
            temp.0.canonicalize().unwrap().join("run-1.task_2")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(workspace.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn an_existing_workspace_is_reused_but_a_link_in_its_place_is_refused() {
        let temp = TempRoot::new("reuse");
        let first = Workspace::create(&temp.0, "task").unwrap();
        first.write_file("kept.txt", b"still here", 100).unwrap();
        let again = Workspace::create(&temp.0, "task").unwrap();
        assert_eq!(again.read_file("kept.txt", 100).unwrap().text, "still here");

        symlink("/", temp.0.join("linked")).unwrap();
        let error = Workspace::create(&temp.0, "linked").unwrap_err();
        assert!(matches!(error, Error::InvalidName { .. }), "{error}");
    }

    #[test]
    fn relative_absolute_and_home_paths_resolve_inside() {
        let (_temp, workspace, _) = setup("resolve");
        let root = workspace.root().to_path_buf();
        fs::create_dir_all(root.join("src")).unwrap();
        fs::write(root.join("src/main.rs"), "fn main() {}").unwrap();
        assert_eq!(
            workspace.resolve("src/main.rs").unwrap(),
            root.join("src/main.rs")
        );
        assert_eq!(
            workspace.resolve("./src/../src/main.rs").unwrap(),
            root.join("src/main.rs")
        );
        assert_eq!(workspace.resolve("").unwrap(), root);
        assert_eq!(workspace.resolve(".").unwrap(), root);
        assert_eq!(workspace.resolve("~").unwrap(), root);
        assert_eq!(workspace.resolve("~/src").unwrap(), root.join("src"));
        let absolute = root.join("src/main.rs").display().to_string();
        assert_eq!(
            workspace.resolve(&absolute).unwrap(),
            root.join("src/main.rs")
        );
        // Not there yet, under a directory that is (or is not yet either): fine.
        assert_eq!(
            workspace.resolve("src/new.rs").unwrap(),
            root.join("src/new.rs")
        );
        assert_eq!(
            workspace.resolve("a/b/c.txt").unwrap(),
            root.join("a/b/c.txt")
        );
        assert_eq!(workspace.resolve("a/../c.txt").unwrap(), root.join("c.txt"));
    }

    #[test]
    fn paths_outside_are_refused() {
        let (_temp, workspace, outside) = setup("outside");
        for path in [
            "/etc/passwd",
            "/",
            "..",
            "../outside/secret.txt",
            "src/../../outside",
            "new/../../x",
            "~//etc/passwd",
            &outside.join("secret.txt").display().to_string(),
        ] {
            let error = workspace.resolve(path).unwrap_err();
            assert!(
                matches!(error, Error::OutsideWorkspace { .. }),
                "{path:?}: {error}"
            );
        }
        let error = workspace.resolve("~root/x").unwrap_err();
        assert!(matches!(error, Error::InvalidPath { .. }), "{error}");
        let error = workspace.resolve("a\0b").unwrap_err();
        assert!(matches!(error, Error::InvalidPath { .. }), "{error}");
    }

    #[test]
    fn links_that_lead_outside_are_refused_and_links_inside_are_followed() {
        let (_temp, workspace, outside) = setup("links");
        let root = workspace.root().to_path_buf();
        symlink(&outside, root.join("escape")).unwrap();
        symlink("/etc", root.join("link_to_etc")).unwrap();
        symlink(outside.join("new.txt"), root.join("dangling")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        fs::create_dir_all(root.join("real")).unwrap();
        fs::write(root.join("real/file.txt"), "inside").unwrap();
        symlink("real", root.join("alias")).unwrap();
        symlink(root.join("real/file.txt"), root.join("file_link")).unwrap();

        for path in [
            "escape",
            "escape/secret.txt",
            "escape/not-yet.txt",
            "link_to_etc/passwd",
            "dangling",
            "loop",
            "loop/x",
            "alias/../escape/x",
        ] {
            let error = workspace.resolve(path).unwrap_err();
            assert!(
                matches!(error, Error::SymlinkEscape { .. }),
                "{path:?}: {error}"
            );
        }
        assert_eq!(
            workspace.resolve("alias/file.txt").unwrap(),
            root.join("real/file.txt")
        );
        assert_eq!(
            workspace.resolve("alias/new.txt").unwrap(),
            root.join("real/new.txt")
        );
        assert_eq!(
            workspace.resolve("file_link").unwrap(),
            root.join("real/file.txt")
        );
        // Writing through a dangling link would create its target outside.
        let error = workspace.write_file("dangling", b"x", 10).unwrap_err();
        assert!(matches!(error, Error::SymlinkEscape { .. }), "{error}");
        assert!(!outside.join("new.txt").exists());
        let error = workspace.read_file("escape/secret.txt", 100).unwrap_err();
        assert!(matches!(error, Error::SymlinkEscape { .. }), "{error}");
    }

    #[test]
    fn reads_are_bounded_and_say_how_much_there_is() {
        let (_temp, workspace, _) = setup("read");
        workspace
            .write_file("notes/a.txt", b"hello world", 100)
            .unwrap();
        let content = workspace.read_file("notes/a.txt", 100).unwrap();
        assert_eq!(
            content,
            FileContent {
                text: "hello world".into(),
                truncated: false,
                total_bytes: 11
            }
        );
        let content = workspace.read_file("notes/a.txt", 5).unwrap();
        assert_eq!(content.text, "hello");
        assert!(content.truncated);
        assert_eq!(content.total_bytes, 11);
        // "é" is two bytes: a limit inside it leaves it out rather than half of it.
        workspace
            .write_file("utf8.txt", "aé".as_bytes(), 100)
            .unwrap();
        let content = workspace.read_file("utf8.txt", 2).unwrap();
        assert_eq!(content.text, "a");
        assert!(content.truncated);

        let error = workspace.read_file("missing.txt", 100).unwrap_err();
        assert_eq!(error.to_string(), "path \"missing.txt\" does not exist");
        let error = workspace.read_file("notes", 100).unwrap_err();
        assert!(matches!(error, Error::IsADirectory { .. }), "{error}");
        let error = workspace.read_file("/etc/passwd", 100).unwrap_err();
        assert!(matches!(error, Error::OutsideWorkspace { .. }), "{error}");
    }

    #[test]
    fn writes_are_bounded_and_stay_inside() {
        let (_temp, workspace, outside) = setup("write");
        let error = workspace.write_file("big.bin", &[0; 11], 10).unwrap_err();
        assert_eq!(
            error.to_string(),
            "content of 11 bytes is over the limit of 10 bytes per file; nothing was written"
        );
        assert!(!workspace.root().join("big.bin").exists());
        workspace
            .write_file("deep/er/f.txt", b"first version", 100)
            .unwrap();
        workspace
            .write_file("deep/er/f.txt", b"second", 100)
            .unwrap();
        assert_eq!(
            fs::read_to_string(workspace.root().join("deep/er/f.txt")).unwrap(),
            "second"
        );
        let error = workspace
            .write_file("../outside/x.txt", b"x", 100)
            .unwrap_err();
        assert!(matches!(error, Error::OutsideWorkspace { .. }), "{error}");
        let error = workspace.write_file(".", b"x", 100).unwrap_err();
        assert!(matches!(error, Error::IsADirectory { .. }), "{error}");
        let error = workspace.write_file("deep", b"x", 100).unwrap_err();
        assert!(matches!(error, Error::IsADirectory { .. }), "{error}");
        assert!(!outside.join("x.txt").exists());
    }

    #[test]
    fn a_fifo_is_not_read_or_written() {
        let (_temp, workspace, _) = setup("fifo");
        let fifo = workspace.root().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let error = workspace.read_file("pipe", 10).unwrap_err();
        assert!(matches!(error, Error::NotAFile { .. }), "{error}");
        // No reader: opening for writing fails at once (ENXIO) rather than waiting for one.
        assert!(workspace.write_file("pipe", b"x", 10).is_err());
    }

    #[test]
    fn remove_deletes_the_workspace_but_not_what_links_point_to() {
        let (_temp, workspace, outside) = setup("remove");
        symlink(&outside, workspace.root().join("escape")).unwrap();
        workspace.write_file("a/b.txt", b"x", 10).unwrap();
        let root = workspace.root().to_path_buf();
        workspace.remove().unwrap();
        assert!(!root.exists());
        assert!(outside.join("secret.txt").exists());
    }
}
