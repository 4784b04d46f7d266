//! The OCI image config (the `config` blob of an image manifest): what
//! the guest's init runs when the image has no `/sbin/init` of its own.
//! Read from the verified blob in the store, bounded, every string checked
//! (no NUL; `Env` entries `KEY=VALUE` with a non-empty key).

/// The config blob's largest accepted size.
pub const MAX_CONFIG: u64 = 4 << 20;
/// Most arguments, environment entries, and the longest string.
const MAX_ITEMS: usize = 4096;
const MAX_STRING: usize = 128 << 10;

/// What a container image says to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OciConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE`, in the image's order.
    pub env: Vec<String>,
    /// Empty: `/`.
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty: root.
    pub user: String,
}

impl OciConfig {
    /// The command line: Entrypoint then Cmd (the OCI rule when a run
    /// gives no arguments of its own).
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// Parses and checks a config blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            config: Option<Inner>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "PascalCase")]
        struct Inner {
            #[serde(default)]
            entrypoint: Option<Vec<String>>,
            #[serde(default)]
            cmd: Option<Vec<String>>,
            #[serde(default)]
            env: Option<Vec<String>>,
            #[serde(default)]
            working_dir: Option<String>,
            #[serde(default)]
            user: Option<String>,
        }
        if bytes.len() as u64 > MAX_CONFIG {
            return Err(format!("{} bytes, at most {MAX_CONFIG}", bytes.len()));
        }
        let f: File = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let c = f.config.unwrap_or_default();
        let config = OciConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        };
        for (field, list) in [
            ("Entrypoint", &config.entrypoint),
            ("Cmd", &config.cmd),
            ("Env", &config.env),
        ] {
            if list.len() > MAX_ITEMS {
                return Err(format!(
                    "{field}: {} items, at most {MAX_ITEMS}",
                    list.len()
                ));
            }
            for s in list {
                check_string(field, s)?;
            }
        }
        for e in &config.env {
            if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                return Err(format!("Env: {e:?} is not KEY=VALUE"));
            }
        }
        check_string("WorkingDir", &config.working_dir)?;
        if !config.working_dir.is_empty() && !config.working_dir.starts_with('/') {
            return Err(format!(
                "WorkingDir: {:?} is not absolute",
                config.working_dir
            ));
        }
        check_string("User", &config.user)?;
        Ok(config)
    }
}

fn check_string(field: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') || s.len() > MAX_STRING {
        return Err(format!(
            "{field}: a string of {} bytes or with NUL",
            s.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_to_run() {
        let c = OciConfig::parse(
            br#"{"architecture":"amd64","config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],
            "Env":["PATH=/bin","A=b=c"],"WorkingDir":"/srv","User":"1000:1000"}}"#,
        )
        .unwrap();
        assert_eq!(c.argv(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.env, ["PATH=/bin", "A=b=c"]);
        assert_eq!(
            (c.working_dir.as_str(), c.user.as_str()),
            ("/srv", "1000:1000")
        );
        let empty = OciConfig::parse(br#"{"config":{"Cmd":null}}"#).unwrap();
        assert_eq!(empty, OciConfig::default());
        assert_eq!(OciConfig::parse(b"{}").unwrap(), OciConfig::default());
    }

    #[test]
    fn refuses_what_no_init_can_run() {
        for (json, want) in [
            (r#"{"config":{"Env":["=x"]}}"#, "KEY=VALUE"),
            (r#"{"config":{"Env":["novalue"]}}"#, "KEY=VALUE"),
            (r#"{"config":{"Cmd":["a\u0000b"]}}"#, "NUL"),
            (r#"{"config":{"WorkingDir":"srv"}}"#, "not absolute"),
            (r#"{"config":{"Cmd":"sh"}}"#, "invalid type"),
        ] {
            let err = OciConfig::parse(json.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
