//! The daemon's lifecycle event stream (`/1.0/events?type=lifecycle`).

use std::path::Path;

use futures::{Stream, StreamExt};
use serde_json::Value;
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::Message;

use crate::Error;

/// One lifecycle event: an action on an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// The instance name (taken from the event's `source`).
    pub instance: String,
    /// The action, e.g. `instance-shutdown`, `instance-stopped`, `instance-started`.
    pub action: String,
    pub timestamp: String,
}

/// Opens the lifecycle event websocket. The stream ends when the daemon goes
/// away; callers reconnect.
pub async fn lifecycle_events(
    socket: &Path,
) -> Result<impl Stream<Item = LifecycleEvent> + Send + 'static, Error> {
    let unreachable = |reason: String| Error::Unreachable {
        socket: socket.to_path_buf(),
        reason,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (ws, _) =
        tokio_tungstenite::client_async("ws://localhost/1.0/events?type=lifecycle", stream)
            .await
            .map_err(|e| unreachable(format!("events websocket: {e}")))?;
    Ok(ws.filter_map(|msg| async move {
        let text = match msg {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Binary(b)) => String::from_utf8_lossy(&b).to_string(),
            _ => return None,
        };
        parse_event(&text)
    }))
}

/// Parses one event message; non-instance events give `None`.
pub fn parse_event(text: &str) -> Option<LifecycleEvent> {
    let v: Value = serde_json::from_str(text).ok()?;
    let md = &v["metadata"];
    let action = md["action"].as_str()?.to_string();
    let source = md["source"].as_str()?;
    let rest = source.strip_prefix("/1.0/instances/")?;
    let name = rest.split(['/', '?']).next()?.to_string();
    Some(LifecycleEvent {
        instance: name,
        action,
        timestamp: v["timestamp"].as_str().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instance_events_only() {
        let ev = r#"{"type":"lifecycle","timestamp":"t","metadata":{"action":"instance-shutdown","source":"/1.0/instances/alice?project=default"}}"#;
        assert_eq!(
            parse_event(ev),
            Some(LifecycleEvent {
                instance: "alice".into(),
                action: "instance-shutdown".into(),
                timestamp: "t".into()
            })
        );
        let other = r#"{"type":"lifecycle","metadata":{"action":"network-created","source":"/1.0/networks/br0"}}"#;
        assert_eq!(parse_event(other), None);
    }
}
