//! The agent's control socket: a Unix socket (mode 0600, root's peers
//! only, checked with `SO_PEERCRED`) taking one JSON request per line and
//! answering one JSON response per line. `pyprobe ctl` is its client.
//! Control never goes over TCP.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// Where the control socket is unless `--control` says otherwise.
pub const DEFAULT_CONTROL: &str = "/run/pyprobe/control.sock";

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// What the agent watches and what it lost.
    Status,
    /// Sets the continuous profile's sampling rate.
    ProfileRate {
        /// Samples per second of CPU time.
        hz: u64,
    },
    /// Adds a log point.
    LogAdd(LogAdd),
    /// The log points and what happened at each.
    LogList,
    /// Takes a log point off.
    LogRm {
        /// Its id.
        id: String,
    },
    /// Starts counting calls.
    CallsStart(CallsStart),
    /// The counts of a calls job so far (or its final ones).
    CallsShow {
        /// Its id.
        id: String,
    },
    /// Stops a calls job; answers its final counts.
    CallsStop {
        /// Its id.
        id: String,
    },
}

/// A calls job to start: which processes, which functions, how long.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CallsStart {
    /// Which processes.
    #[serde(flatten)]
    pub targets: Targets,
    /// Only functions whose file or qualified name contains this.
    #[serde(default)]
    pub filter: Option<String>,
    /// Seconds until it stops by itself.
    pub ttl_seconds: f64,
}

/// Which processes a log point or a calls job is for: exactly one of
/// these.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Targets {
    /// These processes (host PIDs)...
    #[serde(default)]
    pub pids: Vec<u32>,
    /// ...or those whose command line matches this regular expression...
    #[serde(default)]
    pub name: Option<String>,
    /// ...or those in the container whose id starts with this...
    #[serde(default)]
    pub container: Option<String>,
    /// ...or every Python process.
    #[serde(default)]
    pub all: bool,
}

impl Targets {
    /// The processes, as a scope; one that gives none or several of the
    /// four ways is refused, as a bad `--name`.
    pub fn scope(&self) -> anyhow::Result<crate::logpoint::session::PointScope> {
        let given = usize::from(!self.pids.is_empty())
            + usize::from(self.name.is_some())
            + usize::from(self.container.is_some())
            + usize::from(self.all);
        if given != 1 {
            anyhow::bail!("say which processes: one of --pid, --all, --name, --container");
        }
        let name = match &self.name {
            Some(re) => Some(
                regex::Regex::new(re)
                    .map_err(|_| anyhow::anyhow!("--name {re:?} is not a regular expression"))?,
            ),
            None => None,
        };
        Ok(crate::logpoint::session::PointScope {
            pids: self.pids.clone(),
            select: crate::selection::Selector {
                name,
                container: self.container.clone(),
                family: Vec::new(),
            },
        })
    }

    /// The processes, in words.
    pub fn describe(&self) -> anyhow::Result<String> {
        let scope = self.scope()?;
        Ok(if scope.pids.is_empty() {
            scope.select.describe()
        } else {
            format!(
                "PID {}",
                scope
                    .pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// A log point to add: where, when, what, for which processes, how long.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LogAdd {
    /// Which processes.
    #[serde(flatten)]
    pub targets: Targets,
    /// `FILE:LINE`, `FILE:FUNCTION` or `MODULE:QUALNAME`.
    pub at: String,
    /// Condition.
    #[serde(default)]
    pub when: Option<String>,
    /// Message template.
    #[serde(default)]
    pub msg: Option<String>,
    /// Hits written per second at most (0: no limit).
    pub rate: u32,
    /// Hits written in all at most; then it ends.
    #[serde(default)]
    pub count: Option<u64>,
    /// Seconds until it ends by itself.
    pub ttl_seconds: f64,
}

/// The agent's answer: `ok` with a body, or an error line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was asked for.
    #[serde(default)]
    pub body: serde_json::Value,
}

impl Response {
    /// A success with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            body,
        }
    }

    /// A refusal saying why.
    pub fn error(why: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(why.into()),
            body: serde_json::Value::Null,
        }
    }
}

/// A request on its way to the agent's loop, with where to answer.
pub type Call = (Request, oneshot::Sender<Response>);

/// The bound control socket; the file goes when this does.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (its directory made, mode 0700, if missing) with mode
    /// 0600. A socket file left by an agent that is gone is replaced; one
    /// another agent answers on is an error.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot make {}: {e}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "another agent answers on {} (stop it, or give this one another --control)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .map_err(|e| anyhow::anyhow!("cannot replace {}: {e}", path.display()))?;
        }
        // Made with no access for others from the start, then 0600.
        // SAFETY: umask(2) only swaps the process's file mode mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, putting the old mask back.
        unsafe { libc::umask(old) };
        let listener =
            bound.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves connections until the agent ends: each request of a root
    /// peer goes to `calls`; others are refused.
    pub async fn serve(self, calls: mpsc::Sender<Call>) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                continue;
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                let _ = serve_one(stream, calls).await;
            });
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection: refused unless its peer is root; then request, answer,
/// until it closes.
async fn serve_one(stream: UnixStream, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    if uid != 0 {
        let refusal = Response::error(format!(
            "refused: the control socket answers root only (your uid is {uid}); run pyprobe ctl as root"
        ));
        write
            .write_all(format!("{}\n", serde_json::to_string(&refusal)?).as_bytes())
            .await?;
        return Ok(());
    }
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if calls.send((request, tx)).await.is_err() {
                    Response::error("the agent is stopping")
                } else {
                    rx.await
                        .unwrap_or_else(|_| Response::error("the agent dropped the request"))
                }
            }
            Err(e) => Response::error(format!("not a request: {e}")),
        };
        write
            .write_all(format!("{}\n", serde_json::to_string(&response)?).as_bytes())
            .await?;
    }
    Ok(())
}

/// Sends `request` to the agent at `path` and returns its answer.
pub fn call(path: &Path, request: &Request) -> anyhow::Result<Response> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the agent at {}: {e} (is `pyprobe agent` running? as root?)",
            path.display()
        )
    })?;
    // A refused peer's request may meet a closed socket: the refusal is
    // read all the same.
    let wrote = stream.write_all(format!("{}\n", serde_json::to_string(request)?).as_bytes());
    let mut line = String::new();
    let _ = std::io::BufReader::new(&stream).read_line(&mut line);
    if line.is_empty() {
        wrote?;
        anyhow::bail!("the agent at {} closed the connection", path.display());
    }
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_tagged_json() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"profile_rate","hz":49}"#).unwrap(),
            Request::ProfileRate { hz: 49 }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
    }
}
