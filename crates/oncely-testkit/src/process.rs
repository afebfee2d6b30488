//! Server processes tied to the test process's life.
//!
//! Test servers live in statics, which Rust never drops, so a `Drop` impl cannot be what
//! stops them. Instead each server runs under a small `sh` watchdog that reads its own
//! stdin: the test process holds the write end, and when the test process exits, for
//! whatever reason, the pipe closes, `read` returns, and the watchdog kills the server.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process that dies with the test process, or earlier by [`kill`](Self::kill)
/// or drop.
#[derive(Debug)]
pub struct TiedProcess {
    watchdog: Child,
    // Held only so that the pipe closes when the test process exits.
    _stdin: ChildStdin,
    pid: u32,
}

impl TiedProcess {
    /// Spawns `command` under the watchdog. Its stdout and stderr are discarded; servers
    /// are expected to log to a file.
    ///
    /// # Panics
    /// When `sh` cannot be spawned: a test setup failure.
    pub fn spawn(command: Command) -> TiedProcess {
        Self::spawn_cleaning(command, None)
    }

    /// As [`spawn`](Self::spawn), and when the test process exits, the watchdog also
    /// removes `dir` once the server is gone: the directory of a server kept in a static,
    /// whose `TempDir` is never dropped.
    pub fn spawn_cleaning(command: Command, dir: Option<&std::path::Path>) -> TiedProcess {
        let program = command.get_program().to_owned();
        let mut watchdog = Command::new("sh");
        watchdog
            .arg("-c")
            .arg(concat!(
                r#""$@" >/dev/null 2>&1 </dev/null & child=$!; echo "$child"; read _unused; "#,
                r#"kill -9 "$child" 2>/dev/null; wait "$child" 2>/dev/null; "#,
                r#"if [ -n "$ONCELY_TIED_CLEANUP" ]; then rm -rf "$ONCELY_TIED_CLEANUP"; fi"#
            ))
            .arg("sh")
            .arg(&program)
            .args(command.get_args());
        if let Some(dir) = command.get_current_dir() {
            watchdog.current_dir(dir);
        }
        if let Some(dir) = dir {
            watchdog.env("ONCELY_TIED_CLEANUP", dir);
        }
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => watchdog.env(key, value),
                None => watchdog.env_remove(key),
            };
        }
        let mut watchdog = watchdog
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program:?} under sh: {e}"));
        let stdin = watchdog.stdin.take().expect("piped stdin");
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the watchdog prints the server's pid");
        let pid = line.trim().parse().unwrap_or_else(|_| panic!("{program:?} did not start: {line:?}"));
        TiedProcess { watchdog, _stdin: stdin, pid }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the server with SIGKILL and waits for the watchdog to finish.
    /// Returns once the process is gone (or a zombie), so its port is free again.
    pub fn kill(self) {
        drop(self);
    }

    fn kill_now(&mut self) {
        let _ = Command::new("kill").args(["-9", &self.pid.to_string()]).status();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let stat = format!("/proc/{}/stat", self.pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match std::fs::read_to_string(&stat) {
                // The state follows the parenthesised command name.
                Ok(s) if s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return,
            }
        }
    }
}

impl Drop for TiedProcess {
    fn drop(&mut self) {
        self.kill_now();
    }
}
