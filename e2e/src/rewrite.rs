//! Rewriting container paths to host paths.
//!
//! localnode runs containers as plain host processes: there is no mount namespace and no chroot, so a
//! volume mounted at `/etc/secret` in the Pod spec cannot appear at that path. Instead each volume is
//! materialised in a per-pod directory on the host, and every occurrence of a mount path in the
//! container's command, args, env values and working dir is replaced by the host directory. An
//! occurrence counts only where the mount path stands as a whole path prefix: it must start the string
//! or follow a character that cannot be part of a path (such as `=`, `:`, `,`, a space or a quote), and
//! it must end the string or be followed by `/` or such a character. So with a mount at `/data`,
//! `--data=/data/x` and `/data:/other` are rewritten, but `/database` and `/srv/data` are not. The
//! longest mount path wins where mounts nest.

use std::path::{Path, PathBuf};

/// One mapping from a path inside the "container" to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMapping {
    pub container: String,
    pub host: PathBuf,
}

/// A set of mappings, applied longest container path first.
#[derive(Debug, Clone, Default)]
pub struct PathRewriter {
    mappings: Vec<PathMapping>,
}

fn is_path_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '~' | '+' | '@')
}

/// A character that may follow a mount path inside a longer path name and still keep it the same
/// path (only `/`), versus one that would make it a different name.
fn extends_name(c: char) -> bool {
    is_path_char(c) && c != '/'
}

impl PathRewriter {
    pub fn new(mut mappings: Vec<PathMapping>) -> Self {
        for m in &mut mappings {
            // `/data/` and `/data` name the same mount point; `/` itself is never rewritten.
            while m.container.len() > 1 && m.container.ends_with('/') {
                m.container.pop();
            }
        }
        mappings.retain(|m| m.container.starts_with('/') && m.container.len() > 1);
        mappings.sort_by_key(|m| std::cmp::Reverse(m.container.len()));
        Self { mappings }
    }

    pub fn mappings(&self) -> &[PathMapping] {
        &self.mappings
    }

    /// Maps one container path (for example a working dir) to the host, if a mount covers it.
    pub fn map_path(&self, path: &str) -> Option<PathBuf> {
        for m in &self.mappings {
            if path == m.container {
                return Some(m.host.clone());
            }
            if let Some(rest) = path.strip_prefix(&m.container)
                && let Some(rest) = rest.strip_prefix('/')
            {
                return Some(if rest.is_empty() {
                    m.host.clone()
                } else {
                    m.host.join(rest)
                });
            }
        }
        None
    }

    /// Rewrites every whole-path occurrence of a mount path in `s`.
    pub fn rewrite(&self, s: &str) -> String {
        if self.mappings.is_empty() {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        let mut i = 0;
        let mut prev: Option<char> = None;
        'outer: while i < s.len() {
            let at_boundary = prev.is_none_or(|c| !is_path_char(c));
            if at_boundary && s[i..].starts_with('/') {
                for m in &self.mappings {
                    if s[i..].starts_with(m.container.as_str()) {
                        let end = i + m.container.len();
                        let next = s[end..].chars().next();
                        if next.is_none_or(|c| !extends_name(c)) {
                            out.push_str(&host_str(&m.host));
                            i = end;
                            prev = m.container.chars().last();
                            continue 'outer;
                        }
                    }
                }
            }
            let c = s[i..].chars().next().expect("i is on a char boundary");
            out.push(c);
            prev = Some(c);
            i += c.len_utf8();
        }
        out
    }
}

fn host_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> PathRewriter {
        PathRewriter::new(vec![
            PathMapping {
                container: "/data".into(),
                host: "/h/vol/data".into(),
            },
            PathMapping {
                container: "/data/models/".into(),
                host: "/h/vol/models".into(),
            },
            PathMapping {
                container: "/dev/termination-log".into(),
                host: "/h/c/termination-log".into(),
            },
            PathMapping {
                container: "/".into(),
                host: "/never".into(),
            },
        ])
    }

    #[test]
    fn rewrites_whole_path_prefixes() {
        let r = rw();
        assert_eq!(r.rewrite("/data"), "/h/vol/data");
        assert_eq!(r.rewrite("/data/"), "/h/vol/data/");
        assert_eq!(r.rewrite("/data/x.csv"), "/h/vol/data/x.csv");
        assert_eq!(r.rewrite("--in=/data/x"), "--in=/h/vol/data/x");
        assert_eq!(r.rewrite("/data/a:/data/b"), "/h/vol/data/a:/h/vol/data/b");
        assert_eq!(r.rewrite("a,/data,b"), "a,/h/vol/data,b");
        assert_eq!(
            r.rewrite("'/data/x' \"/data\""),
            "'/h/vol/data/x' \"/h/vol/data\""
        );
        assert_eq!(r.rewrite("/dev/termination-log"), "/h/c/termination-log");
    }

    #[test]
    fn longest_mount_wins() {
        let r = rw();
        assert_eq!(r.rewrite("/data/models/m.bin"), "/h/vol/models/m.bin");
        assert_eq!(r.rewrite("/data/models"), "/h/vol/models");
        assert_eq!(r.rewrite("/data/modelsX"), "/h/vol/data/modelsX");
    }

    #[test]
    fn leaves_other_paths_alone() {
        let r = rw();
        assert_eq!(r.rewrite("/database"), "/database");
        assert_eq!(r.rewrite("/data.txt"), "/data.txt");
        assert_eq!(r.rewrite("/srv/data/x"), "/srv/data/x");
        assert_eq!(r.rewrite("x/data"), "x/data");
        assert_eq!(r.rewrite("/etc/passwd"), "/etc/passwd");
        assert_eq!(r.rewrite(""), "");
        assert_eq!(r.rewrite("ü/data"), "ü/data");
        assert_eq!(r.rewrite("é /data"), "é /h/vol/data");
    }

    #[test]
    fn maps_single_paths() {
        let r = rw();
        assert_eq!(r.map_path("/data"), Some("/h/vol/data".into()));
        assert_eq!(r.map_path("/data/"), Some("/h/vol/data".into()));
        assert_eq!(r.map_path("/data/models/a"), Some("/h/vol/models/a".into()));
        assert_eq!(r.map_path("/database"), None);
        assert_eq!(r.map_path("/"), None);
        assert_eq!(r.mappings().len(), 3, "`/` is dropped");
    }
}
