//! Processes of the control plane: spawned into one process group with their output in a log
//! file, free loopback ports, and a watchdog that cleans up even if the test process dies.

use std::{
    ffi::OsString,
    fs::{self, File},
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The last `lines` lines of a log file, or a note saying why there are none.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(no log at {}: {err})", path.display()),
    }
}

/// One running component (etcd, kube-apiserver, ...), its output going to `log`.
#[derive(Debug)]
pub struct Component {
    pub name: String,
    pub log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    group: Option<u32>,
    child: Child,
}

impl Component {
    /// Starts `program` with `args`. `group` is the process group to join; `None` makes the
    /// new process the leader of a fresh group.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        group: Option<u32>,
    ) -> Result<Self> {
        let child = launch(name, program, args, &log, group)?;
        Ok(Self {
            name: name.to_owned(),
            log,
            program: program.to_owned(),
            args: args.to_vec(),
            group,
            child,
        })
    }

    /// Kills the process and starts it again with the same arguments (same ports, same
    /// data), its output appended to the same log.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.child = launch(&self.name, &self.program, &self.args, &self.log, self.group)?;
        Ok(())
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the tail of the log, if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}) while starting; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    pub fn tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Kills and reaps the process.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(
    name: &str,
    program: &Path,
    args: &[String],
    log: &Path,
    group: Option<u32>,
) -> Result<Child> {
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the log file {}", log.display()))?;
    writeln!(file, "$ {} {}", program.display(), args.join(" "))?;
    let stderr = file.try_clone()?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        .process_group(group.map_or(0, |pgid| pgid as i32));
    command
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills every process of a process group (SIGKILL).
pub fn kill_group(pgid: u32) {
    let _ = Command::new("sh")
        .args(["-c", "kill -KILL -\"$1\" 2>/dev/null", "kill-group"])
        .arg(pgid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A shell process that waits for its stdin to close, then kills the process group and
/// removes the given paths. Its stdin is held by the test process, so it fires when the
/// test process ends in any way (a shared control plane in a `static` is never dropped).
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    pub fn spawn(pgid: u32, remove: &[&Path]) -> Result<Self> {
        let mut args = vec![OsString::from(pgid.to_string())];
        args.extend(remove.iter().map(|path| path.as_os_str().to_owned()));
        Self::with_script(
            "kill -KILL -\"$1\" 2>/dev/null; shift; rm -rf -- \"$@\"",
            &args,
        )
    }

    /// A watchdog that runs the shell `script` (with `args` as `$1`...) once its stdin
    /// closes.
    pub fn with_script(script: &str, args: &[OsString]) -> Result<Self> {
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                &format!("cat >/dev/null\n{script}"),
                "portsentry-tests-watchdog",
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C to the test process must not kill the watchdog first.
            .process_group(0);
        let mut child = command
            .spawn()
            .context("starting the cleanup watchdog (sh): is /bin/sh present?")?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// Lets the watchdog run its cleanup now and waits for it.
    pub fn fire(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
