//! `kubesg-agent install-cni`: puts `kubesg-cni` into the node's CNI chain, keeps it there, and
//! takes it out again.
//!
//! kubesg chains after the cluster's primary CNI (bridge, ptp, flannel, Calico, the AWS VPC CNI,
//! kindnet, …): the container runtime runs the plugins of the primary network's conflist in order
//! and `kubesg-cni` must be the last, so that it sees the interfaces and addresses the others set
//! up (`prevResult`). What this module does, and why:
//!
//! - **The primary network** is the lexically first `*.conf`, `*.conflist` or `*.json` file of the
//!   configuration directory: the one libcni's `ConfFiles` lists first and the runtimes
//!   (containerd, CRI-O, the kubelet's old dockershim) load. Only that file is chained; an entry
//!   left in another file (a new primary appeared before it) is taken out again.
//! - **A conflist is edited as text**, not parsed and re-serialised: the entry is inserted after
//!   the last plugin with the separator and indentation the file already uses between its
//!   plugins, so every other byte (key order, tabs or spaces, a template's odd blank lines) stays
//!   as it was, and removing the entry gives the original bytes back exactly. The JSON is still
//!   parsed first (serde_json) to validate it and to find the plugins; a small scanner then finds
//!   their byte ranges.
//! - **A single-plugin `.conf` (or `.json`) is converted**: a runtime reads a `.conf` as one
//!   plugin, so there is no chain to append to. `<stem>.conflist` is written with the original
//!   object (its text, re-indented) as the first plugin and kubesg as the second, and the
//!   original file is moved aside to `<name>.kubesg-orig` (an extension no runtime loads), which
//!   is what uninstalling moves back. `<stem>.conf` sorts before `<stem>.conflist`, so the
//!   original must leave the directory for the converted list to become the primary.
//! - **Writes are atomic** (a temporary file in the same directory, fsync, rename), keep the
//!   file's mode and owner, and never lose a concurrent rewrite by the primary CNI: the new file
//!   is swapped in with `renameat2(RENAME_EXCHANGE)`, and if what it displaced is not what the
//!   edit was based on (the primary wrote in between), the edit is redone on the displaced
//!   content and swapped in again. A plain rename would silently put back the primary's previous
//!   version.
//! - **Idempotent**: a file that already ends with the right entry is not touched (no write, same
//!   inode), so the watch loop can run every second.
//! - **Versions**: `kubesg-cni` speaks cniVersion 0.3.0 to 1.1.0 (`cni-plugin/src/config.rs`); a
//!   primary network at 0.1.0/0.2.0 (no chaining in those versions) is refused with an error
//!   rather than chained into a list every ADD of which would fail.
//!
//! Removal ([`CniInstaller::uninstall`]) runs on the agent pod's shutdown path only when the Helm
//! release asks for it (`cni.uninstall=true`, see the chart): removing on every shutdown would
//! leave a window during each agent upgrade in which new pods are networked without kubesg and
//! stay unenforced; the agent has no API access to tell an upgrade from an uninstall. The
//! plugin binary is left in place: runtimes that tear a pod down with the configuration it was
//! set up with (CRI-O's cached configs) still call it, and without an agent its DEL is a no-op.

use std::{
    fs,
    io::{self, Write},
    ops::Range,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    fcntl::{renameat2, RenameFlags, AT_FDCWD},
};
use serde_json::Value;
use tracing::{info, warn};

/// The plugin's `type`: its binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "kubesg-cni";

/// Suffix of an original single-plugin file moved aside by a conversion.
pub const ORIGINAL_SUFFIX: &str = ".kubesg-orig";

/// Suffix of the temporary files of atomic writes (an extension no runtime loads).
const TEMP_SUFFIX: &str = ".kubesg-tmp";

/// The extensions libcni loads network configurations from.
pub const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The cniVersions `kubesg-cni` speaks (as `kubesg_cni::config::CniVersion::SUPPORTED`).
pub const SUPPORTED_CNI_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How many times a rewrite is redone on top of a concurrent writer before giving up until the
/// next pass.
const MAX_REBASES: usize = 16;

/// kubesg's entry in the chain: the plugin's options (`cni-plugin/src/config.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainEntry {
    /// `agentSocket`: where the node's agent serves the CNI backend (a host path: the plugin
    /// runs on the host).
    pub agent_socket: String,
    /// `timeoutSeconds`: how long one call to the agent may take.
    pub timeout_seconds: u64,
}

impl ChainEntry {
    /// The entry's keys and values, in the order they are written.
    fn pairs(&self) -> [(&'static str, Value); 3] {
        [
            ("type", Value::from(PLUGIN_TYPE)),
            ("agentSocket", Value::from(self.agent_socket.as_str())),
            ("timeoutSeconds", Value::from(self.timeout_seconds)),
        ]
    }

    /// The entry as a JSON object (to compare with what a file holds).
    pub fn to_value(&self) -> Value {
        Value::Object(
            self.pairs()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    }
}

/// Why a network configuration cannot be chained or unchained.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    /// Not JSON (or not complete yet: a writer may be half-way through).
    #[error("not valid JSON: {0}")]
    Json(String),
    /// JSON, but not a network configuration this can work with.
    #[error("{0}")]
    Shape(String),
    /// A cniVersion kubesg-cni does not speak.
    #[error(
        "cniVersion {0:?} cannot be chained: kubesg-cni speaks {versions} (0.1.0 and 0.2.0 have no chaining)",
        versions = SUPPORTED_CNI_VERSIONS.join(", ")
    )]
    UnsupportedVersion(String),
}

/// Why installing or removing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A configuration file cannot be chained.
    #[error("{}: {source}", path.display())]
    Conf {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfError,
    },
    /// The directory holds something this refuses to overwrite.
    #[error("{0}")]
    Conflict(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Pure text edits.

/// Parses `text` as a conflist: a JSON object with a non-empty `plugins` array of objects and a
/// cniVersion kubesg-cni speaks.
fn parse_conflist(text: &str) -> Result<Value, ConfError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ConfError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ConfError::Shape("a network configuration list must be an object".into()))?;
    let plugins = obj
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| ConfError::Shape("no \"plugins\" array".into()))?;
    if plugins.iter().any(|p| !p.is_object()) {
        return Err(ConfError::Shape("a plugin that is not an object".into()));
    }
    check_version(obj.get("cniVersion"))?;
    Ok(v)
}

fn check_version(version: Option<&Value>) -> Result<(), ConfError> {
    let v = version.and_then(Value::as_str).unwrap_or("");
    if SUPPORTED_CNI_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(ConfError::UnsupportedVersion(v.to_owned()))
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// The text of `text` with `entry` as the last plugin; `None` when it already is exactly that.
/// Entries of ours elsewhere in the list (or with other options) are taken out first.
pub fn insert_entry(text: &str, entry: &ChainEntry) -> Result<Option<String>, ConfError> {
    let v = parse_conflist(text)?;
    let plugins = v["plugins"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if plugins.is_empty() {
        return Err(ConfError::Shape(
            "the plugin list is empty: there is no primary plugin to chain after".into(),
        ));
    }
    let ours: Vec<usize> = (0..plugins.len())
        .filter(|i| is_ours(&plugins[*i]))
        .collect();
    if ours == [plugins.len() - 1] && plugins[plugins.len() - 1] == entry.to_value() {
        return Ok(None);
    }
    let mut out = text.to_owned();
    for i in ours.iter().rev() {
        out = remove_element(&out, *i)?;
    }
    let array = plugins_array(&out)?;
    if array.elements.is_empty() {
        return Err(ConfError::Shape(
            "the plugin list is empty: there is no primary plugin to chain after".into(),
        ));
    }
    Ok(Some(append_entry(&out, &array, entry)))
}

/// The text of `text` without kubesg's entries; `None` when it has none. Removing the entry
/// [`insert_entry`] appended gives back the original bytes.
pub fn remove_entries(text: &str) -> Result<Option<String>, ConfError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ConfError::Json(e.to_string()))?;
    let plugins = v
        .get("plugins")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let ours: Vec<usize> = (0..plugins.len())
        .filter(|i| is_ours(&plugins[*i]))
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let mut out = text.to_owned();
    for i in ours.iter().rev() {
        out = remove_element(&out, *i)?;
    }
    Ok(Some(out))
}

/// The conflist a single-plugin configuration becomes: the original object (its text, indented
/// one level deeper) as the first plugin, then kubesg.
pub fn convert_single(text: &str, entry: &ChainEntry) -> Result<String, ConfError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ConfError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ConfError::Shape("a network configuration must be an object".into()))?;
    if obj.contains_key("plugins") {
        return Err(ConfError::Shape(
            "a configuration list in a single-plugin file (.conf)".into(),
        ));
    }
    if obj.get("type").and_then(Value::as_str).is_none() {
        return Err(ConfError::Shape("no plugin \"type\"".into()));
    }
    check_version(obj.get("cniVersion"))?;
    let name = obj
        .get("name")
        .filter(|n| n.is_string())
        .cloned()
        .ok_or_else(|| ConfError::Shape("no network \"name\"".into()))?;
    let indented: Vec<String> = text
        .trim()
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("    {l}")
            }
        })
        .collect();
    let list = format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [\n{}\n  ]\n}}\n",
        obj["cniVersion"],
        name,
        indented.join("\n")
    );
    insert_entry(&list, entry)?.ok_or_else(|| ConfError::Shape("conversion failed".into()))
}

/// Byte ranges of the `plugins` array and its elements.
struct PluginsArray {
    /// Index of `[`.
    open: usize,
    /// Each element's range.
    elements: Vec<Range<usize>>,
}

/// A scanner over JSON text already validated by serde_json: it only finds where things are.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), ConfError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(ConfError::Json(format!(
                "expected {:?} at byte {}",
                c as char, self.i
            )))
        }
    }

    fn string(&mut self) -> Result<Range<usize>, ConfError> {
        let start = self.i;
        self.expect(b'"')?;
        while let Some(c) = self.peek() {
            self.i += if c == b'\\' { 2 } else { 1 };
            if c == b'"' {
                return Ok(start..self.i);
            }
        }
        Err(ConfError::Json("unterminated string".into()))
    }

    fn value(&mut self) -> Result<Range<usize>, ConfError> {
        let start = self.i;
        match self.peek() {
            Some(b'"') => return self.string(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Ok(start..self.i);
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
                return Err(ConfError::Json("unterminated value".into()));
            }
            _ => {}
        }
        while let Some(c) = self.peek() {
            if matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.i += 1;
        }
        Ok(start..self.i)
    }
}

/// Finds the (last) top-level `plugins` array.
fn plugins_array(text: &str) -> Result<PluginsArray, ConfError> {
    let mut s = Scanner {
        b: text.as_bytes(),
        i: 0,
    };
    let mut found = None;
    s.ws();
    s.expect(b'{')?;
    s.ws();
    if s.peek() == Some(b'}') {
        return Err(ConfError::Shape("no \"plugins\" array".into()));
    }
    loop {
        s.ws();
        let key = s.string()?;
        let key: String =
            serde_json::from_str(&text[key]).map_err(|e| ConfError::Json(e.to_string()))?;
        s.ws();
        s.expect(b':')?;
        s.ws();
        if key == "plugins" && s.peek() == Some(b'[') {
            let open = s.i;
            s.i += 1;
            let mut elements = Vec::new();
            s.ws();
            if s.peek() == Some(b']') {
                s.i += 1;
            } else {
                loop {
                    s.ws();
                    elements.push(s.value()?);
                    s.ws();
                    match s.peek() {
                        Some(b',') => s.i += 1,
                        Some(b']') => {
                            s.i += 1;
                            break;
                        }
                        _ => return Err(ConfError::Json("malformed plugins array".into())),
                    }
                }
            }
            found = Some(PluginsArray { open, elements });
        } else {
            s.value()?;
        }
        s.ws();
        match s.peek() {
            Some(b',') => s.i += 1,
            Some(b'}') => break,
            _ => return Err(ConfError::Json("malformed object".into())),
        }
    }
    found.ok_or_else(|| ConfError::Shape("no \"plugins\" array".into()))
}

/// `text` without plugin `index` and the separator that joined it to its neighbour.
fn remove_element(text: &str, index: usize) -> Result<String, ConfError> {
    let array = plugins_array(text)?;
    let els = &array.elements;
    let range = match (els.len(), index) {
        (0, _) => return Ok(text.to_owned()),
        (1, _) => els[0].clone(),
        (_, 0) => els[0].start..els[1].start,
        (n, i) if i < n => els[i - 1].end..els[i].end,
        _ => return Err(ConfError::Shape("no such plugin".into())),
    };
    let mut out = text.to_owned();
    out.replace_range(range, "");
    Ok(out)
}

/// Appends `entry` after the last element, joined with the separator the list already uses.
fn append_entry(text: &str, array: &PluginsArray, entry: &ChainEntry) -> String {
    let els = &array.elements;
    let last = &els[els.len() - 1];
    let separator = if els.len() >= 2 {
        text[els[els.len() - 2].end..last.start].to_owned()
    } else {
        format!(",{}", &text[array.open + 1..last.start])
    };
    let rendered = render_entry(entry, &text[last.clone()]);
    let mut out = String::with_capacity(text.len() + separator.len() + rendered.len());
    out.push_str(&text[..last.end]);
    out.push_str(&separator);
    out.push_str(&rendered);
    out.push_str(&text[last.end..]);
    out
}

fn leading_ws(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

/// `entry` as a JSON object written in the style of `sample` (the plugin before it): one key per
/// line with the sample's indentation when the sample spans lines, else on one line; the
/// sample's spacing around `:`.
fn render_entry(entry: &ChainEntry, sample: &str) -> String {
    // The spacing around the first key's colon.
    let mut s = Scanner {
        b: sample.as_bytes(),
        i: 1,
    };
    s.ws();
    let colon = if s.string().is_ok() {
        let before = s.i;
        s.ws();
        let pre = &sample[before..s.i];
        let after = s.i + 1;
        s.i = after;
        s.ws();
        let post = &sample[after.min(sample.len())..s.i.min(sample.len())];
        let pre = if pre.contains('\n') { "" } else { pre };
        let post = if post.contains('\n') { " " } else { post };
        format!("{pre}:{post}")
    } else {
        ": ".to_owned()
    };
    let pairs: Vec<String> = entry
        .pairs()
        .iter()
        .map(|(k, v)| format!("{}{colon}{v}", Value::from(*k)))
        .collect();
    let lines: Vec<&str> = sample.lines().collect();
    if lines.len() >= 2 {
        let inner = lines[1..]
            .iter()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('}'))
            .map(|l| leading_ws(l))
            .unwrap_or("  ");
        let close = lines.last().map(|l| leading_ws(l)).unwrap_or("");
        let body: Vec<String> = pairs.iter().map(|p| format!("{inner}{p}")).collect();
        format!("{{\n{}\n{close}}}", body.join(",\n"))
    } else {
        let comma = if sample.contains(", ") { ", " } else { "," };
        let pad = if sample.starts_with("{ ") { " " } else { "" };
        format!("{{{pad}{}{pad}}}", pairs.join(comma))
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

/// The network configuration files of `dir` in the order libcni lists them (by file name): the
/// first is the primary network.
pub fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let loadable = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e));
        if loadable && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The primary network's file: the first of [`config_files`].
pub fn primary_config(dir: &Path) -> io::Result<Option<PathBuf>> {
    Ok(config_files(dir)?.into_iter().next())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `<stem>.conflist` for a single-plugin file.
fn converted_path(single: &Path) -> PathBuf {
    single.with_extension("conflist")
}

/// The moved-aside original a generated conflist came from, if it is one of ours.
fn original_of(conflist: &Path) -> Option<PathBuf> {
    ["conf", "json"]
        .iter()
        .map(|ext| with_suffix(&conflist.with_extension(ext), ORIGINAL_SUFFIX))
        .find(|p| p.is_file())
}

fn read(path: &Path) -> Result<String, InstallError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}{TEMP_SUFFIX}", std::process::id()))
}

/// Writes `content` to a new temporary file beside `path` with `like`'s mode and owner (or
/// `mode` when there is nothing to copy from), synced.
fn write_temp(
    path: &Path,
    content: &[u8],
    like: Option<&fs::Metadata>,
    mode: u32,
) -> Result<PathBuf, InstallError> {
    let tmp = temp_path(path);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let result = (|| {
        f.write_all(content)?;
        let mode = like
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(mode);
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = like {
            let own = f.metadata()?;
            if own.uid() != m.uid() || own.gid() != m.gid() {
                std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
            }
        }
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(InstallError::Io {
            path: tmp,
            source: e,
        });
    }
    Ok(tmp)
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Atomically replaces (or creates) `path` with `content`.
fn replace_file(path: &Path, content: &str, mode: u32) -> Result<(), InstallError> {
    let like = fs::metadata(path).ok();
    let tmp = write_temp(path, content.as_bytes(), like.as_ref(), mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    sync_dir(path);
    Ok(())
}

/// Reads a file another process may be writing in place, until it parses as JSON (or gives up
/// and returns what it has).
fn read_settled(path: &Path) -> Result<String, InstallError> {
    let mut text = read(path)?;
    for _ in 0..20 {
        if serde_json::from_str::<Value>(&text).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        text = read(path)?;
    }
    Ok(text)
}

/// Swaps `content` into `path` with `renameat2(RENAME_EXCHANGE)` and returns what it displaced
/// (`None`: the filesystem has no exchange and a plain rename was done instead).
fn exchange(path: &Path, content: &str) -> Result<Option<String>, InstallError> {
    let like = fs::metadata(path).map_err(io_err(path))?;
    let tmp = write_temp(path, content.as_bytes(), Some(&like), 0o644)?;
    match renameat2(AT_FDCWD, &tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => {}
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            // A filesystem without exchange: a plain rename, which a concurrent writer can
            // lose to; the watch loop re-inserts on its next pass.
            let r = fs::rename(&tmp, path);
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r.map_err(io_err(path))?;
            sync_dir(path);
            return Ok(None);
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(path)(io::Error::from(e)));
        }
    }
    // `tmp` now holds what `path` held; a writer still filling that file in place (rather than
    // renaming) is waited for until it parses.
    let displaced = read(&tmp).and_then(|d| {
        if serde_json::from_str::<Value>(&d).is_ok() {
            Ok(d)
        } else {
            read_settled(&tmp)
        }
    });
    let _ = fs::remove_file(&tmp);
    sync_dir(path);
    displaced.map(Some)
}

/// Applies `edit` to the file at `path` atomically without losing a concurrent writer's version
/// (module documentation). Returns whether the file was changed.
///
/// Every exchange puts one version in place and takes one out. When what it took out is not the
/// version that was expected there, the primary wrote in between, and the version taken out is
/// the newest: it is never dropped. Up to [`MAX_REBASES`] times the edit is redone on it; after
/// that (or when it cannot be chained) it is put back unedited, with the same exchange and the
/// same check, until an exchange displaces exactly what it expected. Only then does this
/// return `Conflict` (or the edit's error), with the primary's newest version in place for the
/// watch loop's next pass. A writer that never pauses for the length of one exchange keeps
/// this loop going; any pause ends it.
fn rewrite(
    path: &Path,
    edit: impl Fn(&str) -> Result<Option<String>, ConfError>,
) -> Result<bool, InstallError> {
    let conf_err = |source| InstallError::Conf {
        path: path.to_path_buf(),
        source,
    };
    let mut expected = read(path)?;
    let Some(mut desired) = edit(&expected).map_err(conf_err)? else {
        return Ok(false);
    };
    let mut rebases = 0;
    // Set once the newest version is being put back unedited: why it could not be chained.
    let mut giving_up: Option<InstallError> = None;
    loop {
        let Some(displaced) = exchange(path, &desired)? else {
            return match giving_up {
                Some(e) => Err(e),
                None => Ok(true),
            };
        };
        if displaced == expected {
            return match giving_up {
                Some(e) => Err(e),
                None => Ok(true),
            };
        }
        // Someone wrote `path` between our read and the exchange: `path` now holds our version
        // of a stale one, and `displaced` is theirs, the newest.
        let theirs = displaced;
        expected = std::mem::replace(&mut desired, theirs.clone());
        if giving_up.is_some() {
            continue;
        }
        if rebases == MAX_REBASES {
            giving_up = Some(InstallError::Conflict(format!(
                "{}: rewritten concurrently more than {MAX_REBASES} times in a row; \
                 the newest version is back in place, chaining it on the next pass",
                path.display()
            )));
            continue;
        }
        rebases += 1;
        match edit(&theirs) {
            Ok(Some(d)) => desired = d,
            Ok(None) => {} // theirs is chained already: put it back as it is
            Err(e) => {
                warn!(path = %path.display(), error = %e, "a concurrent rewrite cannot be chained; restoring it");
                giving_up = Some(conf_err(e));
            }
        }
    }
}

/// What [`CniInstaller::ensure_chained`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chained {
    /// The primary network already ends with kubesg's entry; nothing was written.
    Already(PathBuf),
    /// kubesg's entry was appended to the primary network's conflist.
    Inserted(PathBuf),
    /// A single-plugin file was converted into a conflist ending with kubesg.
    Converted {
        /// The original file, now at `<original>.kubesg-orig`.
        original: PathBuf,
        /// The generated conflist.
        conflist: PathBuf,
    },
    /// The directory has no network configuration yet (the primary CNI has not written it).
    NoNetwork,
}

/// Where to install and what to write: the `install-cni` command's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniInstaller {
    /// The CNI configuration directory (`/etc/cni/net.d` on the host).
    pub conf_dir: PathBuf,
    /// The CNI binary directory (`/opt/cni/bin` on the host).
    pub bin_dir: PathBuf,
    /// The `kubesg-cni` binary to copy there.
    pub plugin_binary: PathBuf,
    /// The entry to chain.
    pub entry: ChainEntry,
}

impl CniInstaller {
    /// The installed plugin's path.
    pub fn installed_binary(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    /// Copies the plugin into the bin directory (temporary file, fsync, rename: a runtime never
    /// executes a half-written binary). Returns whether it was written (false: identical
    /// already).
    pub fn install_binary(&self) -> Result<bool, InstallError> {
        let src = fs::read(&self.plugin_binary).map_err(io_err(&self.plugin_binary))?;
        let dest = self.installed_binary();
        if fs::read(&dest).is_ok_and(|d| d == src) {
            return Ok(false);
        }
        fs::create_dir_all(&self.bin_dir).map_err(io_err(&self.bin_dir))?;
        let tmp = write_temp(&dest, &src, None, 0o755)?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&dest)(e));
        }
        sync_dir(&dest);
        Ok(true)
    }

    /// A cheap check for the watch loop: the installed binary exists with the source's size.
    pub fn binary_looks_installed(&self) -> bool {
        match (
            fs::metadata(&self.plugin_binary),
            fs::metadata(self.installed_binary()),
        ) {
            (Ok(s), Ok(d)) => s.len() == d.len(),
            _ => false,
        }
    }

    /// Makes kubesg the last plugin of the primary network (converting a single-plugin file) and
    /// takes its entries out of every other file. Idempotent.
    pub fn ensure_chained(&self) -> Result<Chained, InstallError> {
        let files = config_files(&self.conf_dir).map_err(io_err(&self.conf_dir))?;
        let Some(primary) = files.first().cloned() else {
            return Ok(Chained::NoNetwork);
        };
        for other in &files[1..] {
            self.unchain_file(other)?;
        }
        let is_list = primary.extension().is_some_and(|e| e == "conflist");
        if is_list {
            let changed = rewrite(&primary, |t| insert_entry(t, &self.entry))?;
            return Ok(if changed {
                Chained::Inserted(primary)
            } else {
                Chained::Already(primary)
            });
        }
        self.convert(&primary)
    }

    /// Converts single-plugin `original` into `<stem>.conflist` and moves it aside.
    fn convert(&self, original: &Path) -> Result<Chained, InstallError> {
        let conflist = converted_path(original);
        let aside = with_suffix(original, ORIGINAL_SUFFIX);
        if conflist.exists() && original_of(&conflist).is_none() {
            return Err(InstallError::Conflict(format!(
                "{} is the primary network but {} exists too (not written by kubesg): \
                 cannot convert the first into the second",
                original.display(),
                conflist.display()
            )));
        }
        let mut text = read(original)?;
        loop {
            let list = convert_single(&text, &self.entry).map_err(|source| InstallError::Conf {
                path: original.to_path_buf(),
                source,
            })?;
            let mode = fs::metadata(original)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            replace_file(&conflist, &list, mode)?;
            fs::rename(original, &aside).map_err(io_err(original))?;
            sync_dir(original);
            // The primary may have rewritten its file between our read and the move: the moved
            // file is the newest; convert again if it is not what we converted.
            let moved = read(&aside)?;
            if moved == text {
                break;
            }
            text = moved;
            fs::rename(&aside, original).map_err(io_err(&aside))?;
        }
        Ok(Chained::Converted {
            original: original.to_path_buf(),
            conflist,
        })
    }

    /// Takes kubesg out of one loadable file: a generated conflist is replaced by its original
    /// (unless the primary wrote a new one meanwhile, which then stays), any other file loses
    /// kubesg's entries. Returns whether anything changed.
    fn unchain_file(&self, path: &Path) -> Result<bool, InstallError> {
        if path.extension().is_some_and(|e| e == "conflist") {
            if let Some(orig) = original_of(path) {
                let restored =
                    PathBuf::from(orig.to_string_lossy().trim_end_matches(ORIGINAL_SUFFIX));
                if restored.exists() {
                    fs::remove_file(&orig).map_err(io_err(&orig))?;
                } else {
                    fs::rename(&orig, &restored).map_err(io_err(&orig))?;
                }
                fs::remove_file(path).map_err(io_err(path))?;
                sync_dir(path);
                return Ok(true);
            }
        }
        match rewrite(path, remove_entries) {
            Ok(changed) => Ok(changed),
            // Not ours to judge: a file kubesg cannot parse holds no entry of kubesg's.
            Err(InstallError::Conf {
                source: ConfError::Json(_) | ConfError::Shape(_),
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes kubesg out of every configuration file, restoring converted originals and the
    /// edited conflists' bytes, and removes leftover temporary files. Returns the files it
    /// changed. The plugin binary stays (module documentation).
    pub fn uninstall(&self) -> Result<Vec<PathBuf>, InstallError> {
        let mut changed = Vec::new();
        let entries = match fs::read_dir(&self.conf_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changed),
            Err(e) => return Err(io_err(&self.conf_dir)(e)),
        };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for path in &names {
            let name = path.to_string_lossy();
            if name.ends_with(TEMP_SUFFIX) {
                let _ = fs::remove_file(path);
            } else if name.ends_with(ORIGINAL_SUFFIX) {
                let restored = PathBuf::from(name.trim_end_matches(ORIGINAL_SUFFIX));
                let generated = converted_path(&restored);
                if restored.exists() {
                    fs::remove_file(path).map_err(io_err(path))?;
                } else {
                    fs::rename(path, &restored).map_err(io_err(path))?;
                }
                if generated.exists() {
                    fs::remove_file(&generated).map_err(io_err(&generated))?;
                }
                sync_dir(path);
                changed.push(restored);
            }
        }
        for path in config_files(&self.conf_dir).map_err(io_err(&self.conf_dir))? {
            if self.unchain_file(&path)? {
                changed.push(path);
            }
        }
        Ok(changed)
    }

    /// One pass of the watch loop: the binary is there, the primary network is chained. Logs
    /// what it changed.
    pub fn reconcile(&self) -> Result<Chained, InstallError> {
        if !self.binary_looks_installed() && self.install_binary()? {
            info!(path = %self.installed_binary().display(), "installed the kubesg-cni binary");
        }
        let chained = self.ensure_chained()?;
        match &chained {
            Chained::Already(_) | Chained::NoNetwork => {}
            Chained::Inserted(path) => {
                info!(file = %path.display(), "chained kubesg-cni as the last plugin")
            }
            Chained::Converted { original, conflist } => info!(
                original = %original.display(),
                conflist = %conflist.display(),
                "converted the single-plugin configuration into a chained conflist"
            ),
        }
        Ok(chained)
    }
}

/// Keeps the chain in place until `shutdown` resolves: [`CniInstaller::reconcile`] every
/// `interval` (the primary CNI may rewrite its file at any time, e.g. kindnet when its inputs
/// change). Errors are logged (each distinct one once) and retried.
pub async fn watch(
    installer: &CniInstaller,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last_error = String::new();
    let mut waiting_logged = false;
    loop {
        match installer.reconcile() {
            Ok(Chained::NoNetwork) if !waiting_logged => {
                info!(dir = %installer.conf_dir.display(), "waiting for the primary network's configuration");
                waiting_logged = true;
            }
            Ok(_) => last_error.clear(),
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    warn!(error = %msg, "cannot chain kubesg-cni; retrying");
                    last_error = msg;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ChainEntry {
        ChainEntry {
            agent_socket: "/var/run/kubesg/agent.sock".into(),
            timeout_seconds: 30,
        }
    }

    const TWO_SPACES: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"n\",\n  \"plugins\": [\n    {\n      \"type\": \"bridge\"\n    }\n  ]\n}\n";

    #[test]
    fn the_entry_follows_the_last_plugin_in_the_files_own_indentation() {
        let out = insert_entry(TWO_SPACES, &entry()).unwrap().unwrap();
        assert_eq!(
            out,
            "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"n\",\n  \"plugins\": [\n    {\n      \"type\": \"bridge\"\n    },\n    {\n      \"type\": \"kubesg-cni\",\n      \"agentSocket\": \"/var/run/kubesg/agent.sock\",\n      \"timeoutSeconds\": 30\n    }\n  ]\n}\n"
        );
        assert_eq!(remove_entries(&out).unwrap().as_deref(), Some(TWO_SPACES));
    }

    #[test]
    fn a_compact_file_gets_a_compact_entry() {
        let text =
            r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"ptp"},{"type":"portmap"}]}"#;
        let out = insert_entry(text, &entry()).unwrap().unwrap();
        assert_eq!(
            out,
            r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"ptp"},{"type":"portmap"},{"type":"kubesg-cni","agentSocket":"/var/run/kubesg/agent.sock","timeoutSeconds":30}]}"#
        );
        assert_eq!(remove_entries(&out).unwrap().as_deref(), Some(text));
    }

    #[test]
    fn an_entry_already_last_with_the_same_options_is_left_alone() {
        let out = insert_entry(TWO_SPACES, &entry()).unwrap().unwrap();
        assert_eq!(insert_entry(&out, &entry()).unwrap(), None);
    }

    #[test]
    fn an_entry_with_other_options_or_not_last_is_replaced_by_one_last() {
        let out = insert_entry(TWO_SPACES, &entry()).unwrap().unwrap();
        let other = ChainEntry {
            timeout_seconds: 5,
            ..entry()
        };
        let replaced = insert_entry(&out, &other).unwrap().unwrap();
        let v: Value = serde_json::from_str(&replaced).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
        assert_eq!(v["plugins"][1], other.to_value());

        let first = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"kubesg-cni"},{"type":"bridge"}]}"#;
        let moved = insert_entry(first, &entry()).unwrap().unwrap();
        let v: Value = serde_json::from_str(&moved).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1], entry().to_value());
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn strings_with_brackets_and_escapes_do_not_confuse_the_scanner() {
        let text = "{\"cniVersion\":\"1.0.0\",\"name\":\"a]\\\"}[\",\"plugins\":[{\"type\":\"bridge\",\"x\":\"}]\\\\\"}]}";
        let out = insert_entry(text, &entry()).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["name"], "a]\"}[");
        assert_eq!(v["plugins"][1], entry().to_value());
        assert_eq!(remove_entries(&out).unwrap().as_deref(), Some(text));
    }

    #[test]
    fn old_versions_and_non_lists_are_refused() {
        let old = r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#;
        assert_eq!(
            insert_entry(old, &entry()),
            Err(ConfError::UnsupportedVersion("0.2.0".into()))
        );
        assert!(matches!(
            insert_entry("{\"cniVersion\":\"1.0.0\",\"plugins\":[", &entry()),
            Err(ConfError::Json(_))
        ));
        assert!(matches!(
            insert_entry(r#"{"cniVersion":"1.0.0","plugins":[]}"#, &entry()),
            Err(ConfError::Shape(_))
        ));
    }

    #[test]
    fn a_single_plugin_becomes_the_first_of_a_list() {
        let single = "{\n    \"cniVersion\": \"0.3.1\",\n    \"name\": \"crio\",\n    \"type\": \"bridge\"\n}\n";
        let out = convert_single(single, &entry()).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "crio");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1], entry().to_value());
        assert!(out.contains("\n        \"type\": \"bridge\"\n"), "{out}");
    }

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "kubesg-rewrite-{test}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn version(mtu: usize) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"n","plugins":[{{"type":"bridge","mtu":{mtu}}}]}}"#
        )
    }

    /// Puts `content` at `path` by rename, as a primary CNI rewrites its file.
    fn primary_writes(path: &Path, content: &str) {
        let tmp = path.with_extension("primary-tmp");
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// `rewrite` with a primary that writes its next version (from `versions`) each time the
    /// edit runs, i.e. between each read and the exchange that follows it: the worst
    /// interleaving, made deterministic. Returns the result and what the file holds after.
    fn rewrite_under_a_writer(
        test: &str,
        versions: &[String],
    ) -> (Result<bool, InstallError>, String) {
        let dir = Scratch::new(test);
        let path = dir.0.join("10-net.conflist");
        fs::write(&path, version(1000)).unwrap();
        let next = std::cell::Cell::new(0);
        let result = rewrite(&path, |text| {
            if let Some(v) = versions.get(next.get()) {
                primary_writes(&path, v);
                next.set(next.get() + 1);
            }
            insert_entry(text, &entry())
        });
        assert_eq!(next.get(), versions.len(), "every version was written");
        let left: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["10-net.conflist"], "temporary files left behind");
        (result, fs::read_to_string(&path).unwrap())
    }

    #[test]
    fn a_rewrite_redone_on_each_concurrent_version_chains_the_last() {
        let versions: Vec<_> = (1..MAX_REBASES).map(|i| version(1000 + i)).collect();
        let (result, file) = rewrite_under_a_writer("rebase", &versions);
        assert!(matches!(result, Ok(true)), "{result:?}");
        let last = versions.last().unwrap();
        assert_eq!(file, insert_entry(last, &entry()).unwrap().unwrap());
    }

    #[test]
    fn more_concurrent_versions_than_rebases_leave_the_newest_in_place() {
        // The edit runs once on the original and once per rebase, writing a version each time:
        // the exchange after the last rebase displaces the newest, which must go back, not be
        // dropped (the CI flake of `concurrent_rewrites_by_the_primary_are_never_lost`).
        let versions: Vec<_> = (0..=MAX_REBASES).map(|i| version(2000 + i)).collect();
        let (result, file) = rewrite_under_a_writer("give-up", &versions);
        assert!(
            matches!(result, Err(InstallError::Conflict(_))),
            "{result:?}"
        );
        assert_eq!(
            &file,
            versions.last().unwrap(),
            "the primary's newest version"
        );
    }

    #[test]
    fn an_unchainable_concurrent_version_is_put_back_as_it_was() {
        let old = r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#.to_string();
        let (result, file) = rewrite_under_a_writer("unchainable", &[version(1001), old.clone()]);
        assert!(
            matches!(
                result,
                Err(InstallError::Conf {
                    source: ConfError::UnsupportedVersion(_),
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(file, old);
    }
}
