//! The supervisor: runs the application as a child so one process replaces `start.sh`.
//!
//! Litestream forwards only SIGINT and SIGTERM, turns every non-zero exit into 1, waits forever
//! for a child that ignores SIGTERM and leaves zombies when it runs as PID 1. Here the child
//! gets its own process group and every signal an operator sends to a service (INT, TERM, HUP,
//! QUIT, USR1, USR2, WINCH) reaches the whole group; a child that outlives
//! `shutdown-timeout` after TERM is killed; exit codes pass through; and because Walden may be
//! PID 1 in a container or a subreaper under systemd, it reaps every orphan itself with
//! `waitpid(-1)` instead of letting tokio own child reaping.
//!
//! Signals are turned into [`Event`]s in exactly one place, [`Signals::start`]; the loop in
//! [`Child::wait`] consumes them, so tests can drive it without real signals.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("empty -exec command")]
    Empty,
    #[error("cannot parse -exec command {command:?}: {reason}")]
    Parse { command: String, reason: String },
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// How the child is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildCommand {
    /// Split into words like a shell would, run without a shell.
    Argv(Vec<String>),
    /// The string uses shell operators (`&&`, `|`, `;`, redirections, `$(…)`), so it runs
    /// through `/bin/sh -c` rather than being cut at the first operator as Litestream does.
    Shell(String),
}

impl ChildCommand {
    pub fn parse(command: &str) -> Result<ChildCommand, SuperviseError> {
        if command.trim().is_empty() {
            return Err(SuperviseError::Empty);
        }
        if has_shell_operator(command) {
            return Ok(ChildCommand::Shell(command.to_string()));
        }
        let words = shell_words::split(command).map_err(|e| SuperviseError::Parse {
            command: command.to_string(),
            reason: e.to_string(),
        })?;
        if words.is_empty() {
            return Err(SuperviseError::Empty);
        }
        Ok(ChildCommand::Argv(words))
    }

    fn program(&self) -> &str {
        match self {
            ChildCommand::Argv(w) => &w[0],
            ChildCommand::Shell(_) => "/bin/sh",
        }
    }
}

/// Whether `s` has an unquoted character that only a shell can interpret.
fn has_shell_operator(s: &str) -> bool {
    let mut chars = s.chars().peekable();
    let (mut single, mut double) = (false, false);
    while let Some(c) = chars.next() {
        match c {
            '\\' if !single => {
                chars.next();
            }
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '$' if !single && chars.peek() == Some(&'(') => return true,
            '`' if !single => return true,
            ';' | '&' | '|' | '<' | '>' if !single && !double => return true,
            _ => {}
        }
    }
    false
}

/// What the supervisor reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A signal to pass on to the child's process group.
    Forward(Signal),
    /// Some child changed state; reap.
    ChildChanged,
}

/// The signals forwarded to the child.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The one place where process signals become [`Event`]s: a signal-hook thread feeding a
/// channel.
pub struct Signals {
    handle: signal_hook::iterator::Handle,
}

impl Signals {
    pub fn start() -> Result<(Signals, mpsc::UnboundedReceiver<Event>), SuperviseError> {
        let mut wanted: Vec<i32> = FORWARDED.iter().map(|s| *s as i32).collect();
        wanted.push(Signal::SIGCHLD as i32);
        let mut signals =
            signal_hook::iterator::Signals::new(&wanted).map_err(SuperviseError::Signals)?;
        let handle = signals.handle();
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for raw in signals.forever() {
                    let event = match Signal::try_from(raw) {
                        Ok(Signal::SIGCHLD) => Event::ChildChanged,
                        Ok(sig) => Event::Forward(sig),
                        Err(_) => continue,
                    };
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            })
            .map_err(SuperviseError::Signals)?;
        Ok((Signals { handle }, rx))
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Makes this process adopt orphaned descendants, so they are reaped here rather than by an
/// init that may not exist (a container) or may not be watching.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to init");
    }
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(i32),
    /// The program was not found (127) or not executable (126).
    NotStarted(u8),
}

/// The running application.
pub struct Child {
    pid: Pid,
}

impl Child {
    /// Starts the child in its own process group with inherited stdin, stdout and stderr.
    /// A program that cannot be started is reported as [`ChildExit::NotStarted`] with the
    /// code a shell would use.
    pub fn spawn(cmd: &ChildCommand) -> Result<Child, (ChildExit, SuperviseError)> {
        let mut command = match cmd {
            ChildCommand::Argv(words) => {
                let mut c = Command::new(&words[0]);
                c.args(&words[1..]);
                c
            }
            ChildCommand::Shell(s) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(s);
                c
            }
        };
        command.process_group(0);
        match command.spawn() {
            Ok(child) => Ok(Child {
                pid: Pid::from_raw(child.id() as i32),
            }),
            Err(source) => {
                let code = match source.kind() {
                    std::io::ErrorKind::NotFound => 127,
                    _ => 126,
                };
                Err((
                    ChildExit::NotStarted(code),
                    SuperviseError::Spawn {
                        program: cmd.program().to_string(),
                        source,
                    },
                ))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Sends `sig` to the child's process group (so a shell's children get it too), falling
    /// back to the child alone if the group is gone.
    pub fn signal(&self, sig: Signal) {
        if signal::killpg(self.pid, sig).is_err() {
            let _ = signal::kill(self.pid, sig);
        }
    }

    /// Forwards signals until the child exits, killing it if it outlives `shutdown_timeout`
    /// after a SIGTERM or SIGINT; reaps every other process that ends meanwhile.
    pub async fn wait(
        &self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        shutdown_timeout: Duration,
    ) -> ChildExit {
        if let Some(exit) = self.reap() {
            return exit;
        }
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Forward(sig)) => {
                        tracing::info!(signal = %sig, pid = self.pid(), "forwarding signal to child");
                        self.signal(sig);
                        if matches!(sig, Signal::SIGTERM | Signal::SIGINT) && deadline.is_none() {
                            deadline = Some(tokio::time::Instant::now() + shutdown_timeout);
                        }
                    }
                    Some(Event::ChildChanged) => {}
                    None => {
                        // No more events can arrive; poll so the child is still noticed.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = timer => {
                    tracing::warn!(pid = self.pid(), timeout = ?shutdown_timeout,
                        "child did not exit after the shutdown timeout; sending SIGKILL");
                    self.signal(Signal::SIGKILL);
                    deadline = None;
                }
            }
            if let Some(exit) = self.reap() {
                return exit;
            }
        }
    }

    /// Reaps every exited process; returns the child's exit once it is among them.
    fn reap(&self) -> Option<ChildExit> {
        let mut ours = None;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if pid == self.pid {
                        ours = Some(ChildExit::Exited(code));
                    } else {
                        tracing::debug!(pid = pid.as_raw(), code, "reaped orphan");
                    }
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    if pid == self.pid {
                        ours = Some(ChildExit::Signaled(sig as i32));
                    } else {
                        tracing::debug!(pid = pid.as_raw(), signal = %sig, "reaped orphan");
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return ours,
                Ok(_) => {}
            }
        }
    }
}

/// Reaps orphans after the child is gone (a subreaper keeps adopting them); returns how many.
pub fn reap_orphans() -> usize {
    let mut n = 0;
    while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG))
    {
        n += 1;
    }
    n
}

/// How a `replicate` run ended, for [`exit_code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Without `-exec`: stopped by a signal; whether the final sync reached every replica.
    Stopped { synced: bool },
    /// With `-exec`: how the child ended and whether the final sync reached every replica.
    Child { exit: ChildExit, synced: bool },
    /// The child was never started because a missing database could not be restored.
    RestoreFailed,
}

/// Exit code when the final sync did not complete (the child itself exited 0).
pub const EXIT_SYNC_FAILED: u8 = 70;
/// Exit code when a missing database could not be restored and the child was not started.
pub const EXIT_RESTORE_FAILED: u8 = 71;

/// The exit-code table, in one place (the README lists it):
///
/// | code | meaning |
/// |---|---|
/// | 0 | child exited 0 (or, without `-exec`, a clean stop) and the final sync succeeded |
/// | 1–125 | the child's own exit code |
/// | 126 / 127 | the child could not be executed / was not found |
/// | 128+N | the child was killed by signal N |
/// | 70 | the child exited 0 (or no child) but the final sync failed |
/// | 71 | a missing database could not be restored; the child was not started |
///
/// A failing child's code wins over a failed final sync (both are logged), because it is what
/// a restart policy should react to.
pub fn exit_code(outcome: &Outcome) -> u8 {
    match *outcome {
        Outcome::Stopped { synced: true } => 0,
        Outcome::Stopped { synced: false } => EXIT_SYNC_FAILED,
        Outcome::RestoreFailed => EXIT_RESTORE_FAILED,
        Outcome::Child { exit, synced } => match exit {
            ChildExit::Exited(0) if synced => 0,
            ChildExit::Exited(0) => EXIT_SYNC_FAILED,
            ChildExit::Exited(code) => (code & 0xff) as u8,
            ChildExit::Signaled(sig) => (128 + sig).min(255) as u8,
            ChildExit::NotStarted(code) => code,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_like_a_shell_and_operators_use_sh() {
        assert_eq!(
            ChildCommand::parse("app --name 'a b' \"c d\"").unwrap(),
            ChildCommand::Argv(vec![
                "app".into(),
                "--name".into(),
                "a b".into(),
                "c d".into()
            ])
        );
        assert_eq!(
            ChildCommand::parse("sh -c 'exit 7'").unwrap(),
            ChildCommand::Argv(vec!["sh".into(), "-c".into(), "exit 7".into()])
        );
        for s in [
            "true && exit 5",
            "a | b",
            "a; b",
            "a > f",
            "echo $(date)",
            "a &",
        ] {
            assert_eq!(
                ChildCommand::parse(s).unwrap(),
                ChildCommand::Shell(s.into()),
                "{s}"
            );
        }
        assert_eq!(
            ChildCommand::parse("echo 'a && b'").unwrap(),
            ChildCommand::Argv(vec!["echo".into(), "a && b".into()])
        );
        assert!(matches!(
            ChildCommand::parse("  "),
            Err(SuperviseError::Empty)
        ));
        assert!(ChildCommand::parse("echo 'unclosed").is_err());
    }

    #[test]
    fn exit_code_table() {
        let child = |exit, synced| Outcome::Child { exit, synced };
        assert_eq!(exit_code(&child(ChildExit::Exited(0), true)), 0);
        assert_eq!(
            exit_code(&child(ChildExit::Exited(0), false)),
            EXIT_SYNC_FAILED
        );
        assert_eq!(exit_code(&child(ChildExit::Exited(3), true)), 3);
        assert_eq!(exit_code(&child(ChildExit::Exited(3), false)), 3);
        assert_eq!(exit_code(&child(ChildExit::Signaled(15), true)), 143);
        assert_eq!(exit_code(&child(ChildExit::NotStarted(127), true)), 127);
        assert_eq!(exit_code(&Outcome::Stopped { synced: true }), 0);
        assert_eq!(
            exit_code(&Outcome::Stopped { synced: false }),
            EXIT_SYNC_FAILED
        );
        assert_eq!(exit_code(&Outcome::RestoreFailed), EXIT_RESTORE_FAILED);
    }
}
