//! Requests, responses and operations over the unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;
use serde_json::{json, Value};

use crate::types::{DaemonKind, Image, Instance, ServerInfo};
use crate::Error;

/// A connection to one daemon's REST API.
#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
    http: HyperClient<UnixConnector, Full<Bytes>>,
    info: ServerInfo,
}

/// A decoded reply: the status, ETag and JSON body.
#[derive(Debug)]
struct Reply {
    etag: Option<String>,
    body: Value,
}

/// What an exec'd command returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

impl Client {
    /// Connects to the daemon at `socket` and detects whether it is Incus or LXD.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, Error> {
        let socket = socket.as_ref().to_path_buf();
        if !socket.exists() {
            return Err(Error::Unreachable {
                socket,
                reason: "no such socket (is the daemon running?)".into(),
            });
        }
        // No idle connections: the daemons' unix listener peeks at the first bytes of
        // each connection inside its accept loop, so one connection that is open but
        // has sent nothing (hyper pools the loser of a connect/checkout race that way)
        // stalls every other client of the daemon until it is used or closed.
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(UnixConnector);
        let placeholder = ServerInfo::from_json(json!({}));
        let mut c = Client {
            socket,
            http,
            info: placeholder,
        };
        let raw = c.get("/1.0").await?;
        c.info = ServerInfo::from_json(raw);
        Ok(c)
    }

    /// What the daemon said about itself at connect time.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// The daemon's kind.
    pub fn kind(&self) -> DaemonKind {
        self.info.kind
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(String, String)],
    ) -> Result<(StatusCode, Option<String>, Bytes), Error> {
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path).into();
        let mut req = Request::builder().method(method.clone()).uri(uri);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let has_body = body.is_some();
        if has_body
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("Content-Type", "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| self.protocol(path, e.to_string()))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| Error::Unreachable {
                socket: self.socket.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim_matches('"').to_string());
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(path, e.to_string()))?
            .to_bytes();
        Ok((status, etag, bytes))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(String, String)],
    ) -> Result<Reply, Error> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).unwrap_or_default()));
        let (status, etag, bytes) = self.raw(method.clone(), path, body, headers).await?;
        let json: Value = serde_json::from_slice(&bytes).map_err(|e| {
            self.protocol(
                path,
                format!("{e} (status {status}: {})", String::from_utf8_lossy(&bytes)),
            )
        })?;
        if json["type"] == "error" || !status.is_success() {
            let code = json["error_code"]
                .as_u64()
                .unwrap_or(status.as_u16() as u64) as u16;
            if code == 412 {
                return Err(Error::Conflict { path: path.into() });
            }
            return Err(Error::Api {
                method: method.to_string(),
                path: path.into(),
                code,
                message: json["error"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_string(),
            });
        }
        if json["type"] == "async" {
            let op = json["operation"]
                .as_str()
                .ok_or_else(|| self.protocol(path, "async reply without operation".into()))?
                .to_string();
            let body = self.wait_operation(&op).await?;
            return Ok(Reply { etag, body });
        }
        Ok(Reply {
            etag,
            body: json["metadata"].clone(),
        })
    }

    fn protocol(&self, path: &str, reason: String) -> Error {
        Error::Protocol {
            path: path.into(),
            reason,
        }
    }

    /// Waits for an operation to finish, returning its final metadata.
    pub async fn wait_operation(&self, op: &str) -> Result<Value, Error> {
        let id = op.rsplit('/').next().unwrap_or(op).to_string();
        loop {
            let path = format!("/1.0/operations/{id}/wait?timeout=30");
            let (status, _, bytes) = self.raw(Method::GET, &path, None, &[]).await?;
            let json: Value =
                serde_json::from_slice(&bytes).map_err(|e| self.protocol(&path, e.to_string()))?;
            let md = &json["metadata"];
            match md["status"].as_str() {
                Some("Success") => return Ok(md.clone()),
                Some("Failure") | Some("Cancelled") => {
                    return Err(Error::Operation {
                        id,
                        message: md["err"].as_str().unwrap_or("unknown").to_string(),
                    })
                }
                _ if status.is_success() || status == StatusCode::INTERNAL_SERVER_ERROR => {
                    // Still running (LXD 5.0 answers 500 on a wait timeout): wait again.
                    if json["type"] == "error" && status != StatusCode::INTERNAL_SERVER_ERROR {
                        return Err(Error::Operation {
                            id,
                            message: json["error"].as_str().unwrap_or("unknown").into(),
                        });
                    }
                    if status == StatusCode::INTERNAL_SERVER_ERROR
                        && json["error"]
                            .as_str()
                            .is_some_and(|e| !e.contains("timeout") && !e.contains("Timeout"))
                    {
                        return Err(Error::Operation {
                            id,
                            message: json["error"].as_str().unwrap_or_default().into(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => {
                    return Err(Error::Api {
                        method: "GET".into(),
                        path,
                        code: status.as_u16(),
                        message: json["error"].as_str().unwrap_or("unknown").into(),
                    })
                }
            }
        }
    }

    /// `GET path`, returning the metadata.
    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        Ok(self.call(Method::GET, path, None, &[]).await?.body)
    }

    /// `POST path` with a JSON body; async replies are waited for.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Error> {
        Ok(self.call(Method::POST, path, Some(body), &[]).await?.body)
    }

    /// `POST path` for an async reply, without waiting: the operation's id and
    /// its first state (e.g. a migration's websocket secrets in its metadata).
    pub async fn post_async(&self, path: &str, body: Value) -> Result<(String, Value), Error> {
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let (status, _, bytes) = self.raw(Method::POST, path, Some(bytes), &[]).await?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(path, format!("{e} (status {status})")))?;
        if json["type"] == "error" || !status.is_success() {
            return Err(Error::Api {
                method: "POST".into(),
                path: path.into(),
                code: json["error_code"]
                    .as_u64()
                    .unwrap_or(status.as_u16() as u64) as u16,
                message: json["error"].as_str().unwrap_or("unknown error").into(),
            });
        }
        let op = json["operation"]
            .as_str()
            .ok_or_else(|| self.protocol(path, "no operation in the reply".into()))?;
        let id = op.rsplit('/').next().unwrap_or(op).to_string();
        Ok((id, json["metadata"].clone()))
    }

    /// An operation's current state (`status`, `metadata`, `err`); `Ok(None)` once
    /// the daemon has forgotten it.
    pub async fn operation(&self, id: &str) -> Result<Option<Value>, Error> {
        match self.get(&format!("/1.0/operations/{id}")).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What the daemon is doing to `instance` right now, if anything (see
    /// [`changing_in`]), e.g. "Restarting instance".
    pub async fn changing(&self, instance: &str) -> Result<Option<String>, Error> {
        let ops = self.get("/1.0/operations?recursion=1").await?;
        Ok(changing_in(&ops, instance))
    }

    /// `PATCH path` with a JSON body (merges keys).
    pub async fn patch(&self, path: &str, body: Value) -> Result<Value, Error> {
        Ok(self.call(Method::PATCH, path, Some(body), &[]).await?.body)
    }

    /// `PUT path` with a JSON body (no ETag); async replies are waited for.
    pub async fn put(&self, path: &str, body: Value) -> Result<Value, Error> {
        Ok(self.call(Method::PUT, path, Some(body), &[]).await?.body)
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Value, Error> {
        Ok(self.call(Method::DELETE, path, None, &[]).await?.body)
    }

    /// Every instance with its config, devices and status (`recursion=1`, cheap).
    pub async fn instances(&self) -> Result<Vec<Instance>, Error> {
        let v = self.get("/1.0/instances?recursion=1").await?;
        serde_json::from_value(v).map_err(|e| self.protocol("/1.0/instances", e.to_string()))
    }

    /// Every image with its fingerprint and aliases (`recursion=1`).
    pub async fn images(&self) -> Result<Vec<Image>, Error> {
        let v = self.get("/1.0/images?recursion=1").await?;
        serde_json::from_value(v).map_err(|e| self.protocol("/1.0/images", e.to_string()))
    }

    /// One instance and its ETag; `Ok(None)` when it does not exist.
    pub async fn instance(&self, name: &str) -> Result<Option<(Instance, String)>, Error> {
        let path = format!("/1.0/instances/{name}");
        match self.call(Method::GET, &path, None, &[]).await {
            Ok(r) => {
                let inst: Instance = serde_json::from_value(r.body)
                    .map_err(|e| self.protocol(&path, e.to_string()))?;
                Ok(Some((inst, r.etag.unwrap_or_default())))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces an instance's writable fields, guarded by its ETag.
    pub async fn put_instance(&self, name: &str, body: Value, etag: &str) -> Result<(), Error> {
        let path = format!("/1.0/instances/{name}");
        let headers = [("If-Match".to_string(), format!("\"{etag}\""))];
        self.call(Method::PUT, &path, Some(body), &headers).await?;
        Ok(())
    }

    /// Changes the power state: `start`, `stop`, `restart`.
    pub async fn set_state(&self, name: &str, action: &str, force: bool) -> Result<(), Error> {
        let path = format!("/1.0/instances/{name}/state");
        self.call(
            Method::PUT,
            &path,
            // As the daemons' own CLIs do: a forced change waits for no clean shutdown.
            Some(json!({"action": action, "timeout": if force { -1 } else { 30 }, "force": force})),
            &[],
        )
        .await?;
        Ok(())
    }

    /// Runs a command inside a running instance and collects its output.
    pub async fn exec(
        &self,
        name: &str,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ExecOutput, Error> {
        let path = format!("/1.0/instances/{name}/exec");
        let env: serde_json::Map<String, Value> = env
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let md = self
            .call(
                Method::POST,
                &path,
                Some(json!({
                    "command": command,
                    "environment": env,
                    "wait-for-websocket": false,
                    "interactive": false,
                    "record-output": true,
                })),
                &[],
            )
            .await?
            .body;
        let md = &md["metadata"];
        let code = md["return"].as_i64().unwrap_or(-1);
        let stdout = self.exec_log(md["output"]["1"].as_str()).await;
        let stderr = self.exec_log(md["output"]["2"].as_str()).await;
        Ok(ExecOutput {
            code,
            stdout,
            stderr,
        })
    }

    async fn exec_log(&self, path: Option<&str>) -> String {
        let Some(path) = path else {
            return String::new();
        };
        match self.raw(Method::GET, path, None, &[]).await {
            Ok((s, _, bytes)) if s.is_success() => {
                let text = String::from_utf8_lossy(&bytes).to_string();
                // Best effort: the log is only needed for reporting.
                let _ = self.raw(Method::DELETE, path, None, &[]).await;
                text
            }
            _ => String::new(),
        }
    }
}

/// In a `GET /1.0/operations?recursion=1` reply: the description of a running
/// task that changes `instance`'s state (a restart, start, stop, freeze or
/// restore someone asked for). Exec sessions, moves and other long work do not count.
pub fn changing_in(ops: &Value, instance: &str) -> Option<String> {
    const CHANGES: &[&str] = &[
        "Restarting",
        "Starting",
        "Stopping",
        "Freezing",
        "Unfreezing",
        "Restoring",
    ];
    let me = format!("/1.0/instances/{instance}");
    ops["running"].as_array()?.iter().find_map(|op| {
        let description = op["description"].as_str()?;
        let changes = op["class"] == "task" && CHANGES.iter().any(|w| description.starts_with(w));
        let on_it = op["resources"]["instances"].as_array()?.iter().any(|r| {
            r.as_str().is_some_and(|r| {
                r == me
                    || r.strip_prefix(me.as_str())
                        .is_some_and(|q| q.starts_with('?'))
            })
        });
        (changes && on_it).then(|| description.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_a_running_state_change_of_that_instance_counts() {
        let op = |class: &str, description: &str, instance: &str| {
            json!({"class": class, "description": description, "status": "Running",
                   "resources": {"instances": [format!("/1.0/instances/{instance}")]}})
        };
        let ops = json!({
            "running": [
                op("websocket", "Executing command", "g0"),
                op("task", "Restarting instance", "g01"),
                op("task", "Restarting instance", "g0?project=default"),
            ],
            "success": [op("task", "Stopping instance", "g1")],
        });
        assert_eq!(
            changing_in(&ops, "g0").as_deref(),
            Some("Restarting instance")
        );
        assert_eq!(
            changing_in(&ops, "g01").as_deref(),
            Some("Restarting instance")
        );
        assert_eq!(
            changing_in(&ops, "g1"),
            None,
            "finished operations do not count"
        );
        assert_eq!(changing_in(&ops, "g"), None);
        let exec_only = json!({"running": [op("websocket", "Executing command", "g0")]});
        assert_eq!(changing_in(&exec_only, "g0"), None);
        assert_eq!(changing_in(&json!({}), "g0"), None, "no operations at all");
    }
}
