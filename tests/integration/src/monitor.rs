//! The daemon's lifecycle events as `incus monitor` prints them, for tests that
//! show that something did not happen to an instance.

use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::{wait_for, Host};

/// `incus monitor --type lifecycle --format json` on a host, read in the background.
pub struct Monitor {
    child: Child,
    seen: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    /// Starts the monitor and returns once it is known to listen: it has reported
    /// the events of a profile made and deleted for the purpose. Only then is "no
    /// event" worth anything.
    pub fn start(host: &Host) -> anyhow::Result<Monitor> {
        let mut child = host
            .cli()
            .args(["monitor", "--type", "lifecycle", "--format", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the daemon's monitor")?;
        let seen = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().context("monitor stdout")?;
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        let m = Monitor {
            child,
            seen,
            reader: Some(reader),
        };
        // The monitor connects some time after it was started: probe until it
        // reports one.
        wait_for(
            "the monitor to see a probe",
            Duration::from_secs(20),
            || {
                host.cli_run(&["profile", "create", "ssp-probe"]).ok()?;
                host.cli_run(&["profile", "delete", "ssp-probe"]).ok()?;
                std::thread::sleep(Duration::from_millis(300));
                m.text().contains("profile-deleted").then_some(())
            },
        )?;
        Ok(m)
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the events printed from now on start, for [`Monitor::events_since`].
    pub fn mark(&self) -> usize {
        self.text().len()
    }

    /// The events printed after `mark`, parsed.
    pub fn events_since(&self, mark: usize) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = self.text();
        text[mark..]
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("incus monitor printed {l}")))
            .collect()
    }
}

/// The instance an event is about (`/1.0/instances/NAME` → `NAME`), if any.
pub fn instance_of(event: &serde_json::Value) -> Option<&str> {
    event["metadata"]["source"]
        .as_str()?
        .strip_prefix("/1.0/instances/")
        .map(|s| s.split(['/', '?']).next().unwrap_or(s))
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
