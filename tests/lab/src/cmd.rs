//! Running commands: echoed (`run`) or quiet (`output`, `ok`), failing
//! with the command line, its status and its stderr.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result, bail};

/// A command that is echoed before it runs and fails with its exit status.
pub struct Cmd(Command);

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let mut c = Command::new(program);
        c.current_dir(root());
        Cmd(c)
    }
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.0.args(args);
        self
    }
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.0.env(k, v);
        self
    }
    fn describe(&self) -> String {
        let mut s = self.0.get_program().to_string_lossy().into_owned();
        for a in self.0.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
    /// Runs with inherited stdio; an error if it fails.
    pub fn run(mut self) -> Result<()> {
        let what = self.describe();
        eprintln!("+ {what}");
        let status = self
            .0
            .status()
            .with_context(|| format!("starting `{what}`"))?;
        if !status.success() {
            bail!("`{what}` failed: {status}");
        }
        Ok(())
    }
    /// Runs quietly and returns stdout; an error if it fails.
    pub fn output(mut self) -> Result<String> {
        let what = self.describe();
        let out = self
            .0
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("starting `{what}`"))?;
        if !out.status.success() {
            bail!(
                "`{what}` failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    /// Runs quietly and returns everything, whatever the exit status.
    pub fn raw(mut self) -> Result<Output> {
        let what = self.describe();
        self.0
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("starting `{what}`"))
    }
    /// Runs quietly; whether it succeeded.
    pub fn ok(mut self) -> bool {
        self.0
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

pub fn cargo(args: &[&str]) -> Result<()> {
    Cmd::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .run()
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The cargo target directory (CARGO_TARGET_DIR or `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `ip ARGS`, quietly.
pub fn ip(args: &[&str]) -> Result<()> {
    Cmd::new("ip").args(args).output().map(drop)
}
