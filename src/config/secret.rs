//! Where secrets come from. Compilation asks a [`SecretSource`] for the value
//! of an environment variable or the contents of a file, so it stays pure and
//! tests can hand it a map instead of the real environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub trait SecretSource {
    fn env(&self, name: &str) -> Result<String, String>;
    fn file(&self, path: &Path) -> Result<Vec<u8>, String>;
    /// Where [`file`](Self::file) reads `path` from (for the reloader to watch).
    fn locate(&self, path: &Path) -> PathBuf {
        path.to_path_buf()
    }
}

/// The real process environment and file system. Relative file paths are
/// taken relative to `base` (the directory of the configuration file).
pub struct EnvAndFiles {
    pub base: PathBuf,
}

impl SecretSource for EnvAndFiles {
    fn env(&self, name: &str) -> Result<String, String> {
        std::env::var(name).map_err(|e| match e {
            std::env::VarError::NotPresent => {
                format!("environment variable {name} is not set")
            }
            std::env::VarError::NotUnicode(_) => {
                format!("environment variable {name} is not valid UTF-8")
            }
        })
    }

    fn file(&self, path: &Path) -> Result<Vec<u8>, String> {
        let full = self.base.join(path);
        std::fs::read(&full).map_err(|e| format!("cannot read {}: {e}", full.display()))
    }

    fn locate(&self, path: &Path) -> PathBuf {
        self.base.join(path)
    }
}

/// The real environment and files, remembering the certificate, key and CA
/// files named (the TLS settings locate each) and any file that could not
/// be read: after a rejected reload the file watcher watches them too, so
/// fixing the certificate a new configuration names is acted on like fixing
/// the configuration itself. Secret files that read fine are not
/// remembered: their rotation (vault-agent, projected tokens) must not retry
/// a configuration rejected for another reason.
pub struct Recording {
    pub real: EnvAndFiles,
    pub read: std::cell::RefCell<Vec<PathBuf>>,
}

impl Recording {
    fn remember(&self, path: PathBuf) {
        let mut read = self.read.borrow_mut();
        if !read.contains(&path) {
            read.push(path);
        }
    }
}

impl SecretSource for Recording {
    fn env(&self, name: &str) -> Result<String, String> {
        self.real.env(name)
    }

    fn file(&self, path: &Path) -> Result<Vec<u8>, String> {
        let read = self.real.file(path);
        if read.is_err() {
            self.remember(self.real.locate(path));
        }
        read
    }

    fn locate(&self, path: &Path) -> PathBuf {
        let located = self.real.locate(path);
        self.remember(located.clone());
        located
    }
}

/// `keygate check --no-secrets`: the real environment and files, except
/// that an unset variable gets a placeholder (long enough for any HMAC
/// key) and is remembered, so the structure of a production file can be
/// checked on a machine without its secrets, as `nginx -t` needs none.
pub struct Placeholders {
    pub real: EnvAndFiles,
    pub unset: std::cell::RefCell<Vec<String>>,
}

impl SecretSource for Placeholders {
    fn env(&self, name: &str) -> Result<String, String> {
        match self.real.env(name) {
            Err(_) if std::env::var_os(name).is_none() => {
                let mut unset = self.unset.borrow_mut();
                if !unset.iter().any(|n| n == name) {
                    unset.push(name.to_string());
                }
                Ok(format!(
                    "keygate-check-placeholder-for-{name}-0123456789abcdef0123456789abcdef"
                ))
            }
            other => other,
        }
    }

    fn file(&self, path: &Path) -> Result<Vec<u8>, String> {
        self.real.file(path)
    }

    fn locate(&self, path: &Path) -> PathBuf {
        self.real.locate(path)
    }
}

/// A fixed set of variables and files, for tests and for `keygate demo`.
#[derive(Default)]
pub struct Fixed {
    pub env: HashMap<String, String>,
    pub files: HashMap<PathBuf, Vec<u8>>,
}

impl SecretSource for Fixed {
    fn env(&self, name: &str) -> Result<String, String> {
        self.env
            .get(name)
            .cloned()
            .ok_or_else(|| format!("environment variable {name} is not set"))
    }

    fn file(&self, path: &Path) -> Result<Vec<u8>, String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| format!("cannot read {}: not found", path.display()))
    }
}
