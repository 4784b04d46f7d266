//! The OCI process a layered image runs when it has no `/sbin/init`:
//! Entrypoint and Cmd with Env, WorkingDir and User, as the image config
//! gives them. It travels to the guest as `/cocoon/exec` in a small cpio
//! appended to the VM's initrd ([`super::initramfs::write_vm_initrd`]),
//! not on the command line, which holds 2 KiB at most.
//!
//! The file is a busybox sh fragment that the init sources; every value is
//! single-quoted by [`ExecConfig::render`], so no byte of the image config
//! is ever interpreted by the shell:
//!
//! ```sh
//! cocoon_workdir='/app'
//! cocoon_user='1000:1000'          # empty: root
//! cocoon_nenv=2                    # how many of "$@" are NAME=VALUE
//! set -- 'PATH=/usr/bin:/bin' 'GREETING=hi' '/bin/sh' '-c' 'echo "$GREETING"'
//! ```

use serde::Deserialize;

/// The file's path in the initramfs.
pub const EXEC_FILE: &str = "cocoon/exec";
/// Docker's PATH when the image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The rendered file is refused beyond this (the image config is the
/// image author's; the guest's initramfs is RAM).
pub const MAX_EXEC_BYTES: usize = 256 << 10;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("OCI config {field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("the OCI process is {len} bytes rendered; at most {MAX_EXEC_BYTES}")]
    TooLarge { len: usize },
    #[error("the OCI image config")]
    Json(#[source] JsonError),
}

/// serde_json's error, comparable for tests.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);
impl PartialEq for JsonError {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for JsonError {}

/// The `config` object of an OCI image config, the fields the guest uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl ExecConfig {
    /// The `config` object of an OCI image config document
    /// (`application/vnd.oci.image.config.v1+json`); a config without one
    /// runs nothing but the image's own init.
    pub fn from_image_config(json: &[u8]) -> Result<Self, ExecError> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            config: Option<ExecConfig>,
        }
        let doc: Doc =
            serde_json::from_slice(json).map_err(|e| ExecError::Json(JsonError(e.to_string())))?;
        Ok(doc.config.unwrap_or_default())
    }

    /// Entrypoint then Cmd, as the runtime spec joins them.
    pub fn argv(&self) -> Vec<String> {
        let mut v = self.entrypoint.clone().unwrap_or_default();
        v.extend(self.cmd.clone().unwrap_or_default());
        v
    }

    /// The environment, with Docker's PATH when the image gives none.
    pub fn environment(&self) -> Vec<String> {
        let mut env = self.env.clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }
        env
    }

    /// The `/cocoon/exec` file (see the module docs).
    pub fn render(&self) -> Result<String, ExecError> {
        let bad = |field, value: &str, reason| ExecError::Invalid {
            field,
            value: value.chars().take(80).collect(),
            reason,
        };
        let argv = self.argv();
        let env = self.environment();
        for a in &argv {
            if a.contains('\0') {
                return Err(bad("Entrypoint/Cmd", a, "contains a NUL byte"));
            }
        }
        if argv.first().is_some_and(|a| a.is_empty()) {
            return Err(bad("Entrypoint/Cmd", "", "the program name is empty"));
        }
        for e in &env {
            if e.contains('\0') {
                return Err(bad("Env", e, "contains a NUL byte"));
            }
            match e.split_once('=') {
                Some((name, _)) if !name.is_empty() => {}
                _ => return Err(bad("Env", e, "not NAME=VALUE")),
            }
        }
        let workdir = self
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        if !workdir.starts_with('/') || workdir.contains('\0') {
            return Err(bad("WorkingDir", &workdir, "not an absolute path"));
        }
        let user = self.user.clone().unwrap_or_default();
        if user.contains('\0') || user.contains('\n') || user.matches(':').count() > 1 {
            return Err(bad("User", &user, "not USER, USER:GROUP, UID or UID:GID"));
        }
        let mut out = format!(
            "cocoon_workdir={}\ncocoon_user={}\ncocoon_nenv={}\nset --",
            quote(&workdir),
            quote(&user),
            env.len()
        );
        for word in env.iter().chain(&argv) {
            out.push(' ');
            out.push_str(&quote(word));
        }
        out.push('\n');
        if out.len() > MAX_EXEC_BYTES {
            return Err(ExecError::TooLarge { len: out.len() });
        }
        Ok(out)
    }
}

/// A pulled image's checked config ([`crate::layer::OciConfig`]): empty
/// fields are the image's silence, not empty values.
impl From<&crate::layer::OciConfig> for ExecConfig {
    fn from(c: &crate::layer::OciConfig) -> Self {
        let some = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        let text = |s: &String| (!s.is_empty()).then(|| s.clone());
        ExecConfig {
            entrypoint: some(&c.entrypoint),
            cmd: some(&c.cmd),
            env: some(&c.env),
            working_dir: text(&c.working_dir),
            user: text(&c.user),
        }
    }
}

/// `s` as one single-quoted sh word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// busybox sh, sourcing the file, gets back exactly the words.
    #[test]
    fn the_shell_reads_back_every_word_exactly() {
        let hostile = [
            "it's",
            "$(reboot)",
            "`id`",
            "a\nb",
            "\"q\"",
            "\\",
            "*",
            " lead",
            "%s",
            "é",
        ];
        let cfg = ExecConfig {
            entrypoint: Some(vec!["/bin/prog".into()]),
            cmd: Some(hostile.iter().map(|s| s.to_string()).collect()),
            env: Some(vec!["A=x y".into(), "B=it's $HOME".into()]),
            working_dir: Some("/srv/my app".into()),
            user: Some("1000:1000".into()),
        };
        let text = cfg.render().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("exec");
        std::fs::write(&file, &text).unwrap();
        let Ok(out) = Command::new("busybox")
            .args(["sh", "-c", ". \"$0\"; printf '%s\\0' \"$cocoon_workdir\" \"$cocoon_user\" \"$cocoon_nenv\" \"$@\""])
            .arg(&file)
            .output()
        else {
            eprintln!("SKIPPED: no busybox");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let words: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(str::to_string)
            .collect();
        let mut want = vec!["/srv/my app".to_string(), "1000:1000".into(), "3".into()];
        want.extend([
            DEFAULT_PATH.to_string(),
            "A=x y".into(),
            "B=it's $HOME".into(),
        ]);
        want.push("/bin/prog".into());
        want.extend(hostile.iter().map(|s| s.to_string()));
        assert_eq!(words, want);
    }

    #[test]
    fn reads_the_oci_config_and_refuses_what_cannot_run() {
        let cfg = ExecConfig::from_image_config(
            br#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w"},"rootfs":{}}"#,
        )
        .unwrap();
        assert_eq!(cfg.argv(), ["sh"]);
        assert_eq!(cfg.environment(), ["PATH=/bin"]);
        assert_eq!(
            ExecConfig::from_image_config(b"{}").unwrap(),
            ExecConfig::default()
        );
        assert!(ExecConfig::from_image_config(b"[").is_err());
        let with = |f: fn(&mut ExecConfig)| {
            let mut c = ExecConfig {
                cmd: Some(vec!["sh".into()]),
                ..Default::default()
            };
            f(&mut c);
            c.render().unwrap_err().to_string()
        };
        assert!(with(|c| c.env = Some(vec!["NOEQUALS".into()])).contains("not NAME=VALUE"));
        assert!(with(|c| c.env = Some(vec!["=v".into()])).contains("not NAME=VALUE"));
        assert!(with(|c| c.cmd = Some(vec!["a\0b".into()])).contains("NUL"));
        assert!(with(|c| c.working_dir = Some("rel".into())).contains("WorkingDir"));
        assert!(with(|c| c.user = Some("a:b:c".into())).contains("User"));
        assert!(with(|c| c.cmd = Some(vec!["x".repeat(MAX_EXEC_BYTES)])).contains("at most"));
    }
}
