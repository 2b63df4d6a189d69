//! Model files: the clear errors for a missing or corrupt one.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a model could not be loaded. Each message tells the user what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{what} model file {path} is missing: run `make models` to fetch it, or point the config at it"
    )]
    Missing { what: &'static str, path: PathBuf },
    #[error(
        "{what} model file {path} is not usable ({reason}): it may be truncated or corrupt; run `make models` to fetch it again"
    )]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} model could not be loaded: {reason}")]
    Load { what: &'static str, reason: String },
}

/// Where `make models` puts the models: `$COLONY_MODELS_DIR` when set, else `.cache/models` at
/// the root of the source tree this crate was built from (for tests, benches and `make run`).
pub fn workspace_models_dir() -> PathBuf {
    match std::env::var_os("COLONY_MODELS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"),
    }
}

/// Fails with [`ModelError::Missing`] unless `path` is a readable regular file.
pub fn require_file(path: &Path, what: &'static str) -> Result<(), ModelError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        _ => Err(ModelError::Missing {
            what,
            path: path.to_path_buf(),
        }),
    }
}

/// The four bytes every GGUF file starts with.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Checks that `path` exists and starts like a GGUF file. llama.cpp's own loader only says
/// "failed to load" for a bad file; this turns the common cases into a clear error first.
pub fn check_gguf(path: &Path, what: &'static str) -> Result<(), ModelError> {
    require_file(path, what)?;
    let corrupt = |reason: String| ModelError::Corrupt {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .map_err(|err| corrupt(format!("cannot read its header: {err}")))?;
    if &magic != GGUF_MAGIC {
        return Err(corrupt(
            "it does not start with the GGUF magic bytes".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_make_models() {
        let err = check_gguf(Path::new("/nonexistent/model.gguf"), "chat")
            .expect_err("a missing file must fail");
        let text = err.to_string();
        assert!(text.contains("make models"), "{text}");
        assert!(text.contains("/nonexistent/model.gguf"), "{text}");
    }

    #[test]
    fn file_without_gguf_magic_is_corrupt() {
        let dir = std::env::temp_dir().join(format!("colony-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("bad.gguf");
        std::fs::write(&path, b"<html>not a model</html>").expect("write");
        let err = check_gguf(&path, "chat").expect_err("a non-GGUF file must fail");
        assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("make models"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
