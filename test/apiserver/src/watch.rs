//! Watch streams: replay from the history ring, then follow new events; bookmarks, timeouts, 410 Gone.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::resource::ResourceInfo;
use crate::selector::Selector;
use crate::server::Shared;
use crate::store::{Event, EventType, StoredObject};

/// Bytes gathered into one HTTP chunk before it is handed to hyper.
const CHUNK: usize = 64 * 1024;
/// History events read per lock acquisition.
const BATCH: usize = 512;

/// A parsed watch request.
pub(crate) struct WatchRequest {
    pub(crate) id: usize,
    pub(crate) namespace: Option<String>,
    pub(crate) selector: Selector,
    /// Start after this revision; `None` = send the current state as ADDED events first.
    pub(crate) from: Option<u64>,
    /// `sendInitialEvents=true`: finish the initial state with an `initial-events-end` bookmark.
    pub(crate) initial_events_end: bool,
    pub(crate) bookmarks: bool,
    pub(crate) timeout: Duration,
}

/// The state a watch response body is generated from; hyper pulls chunks, so a slow client only lags
/// behind in the shared history instead of buffering its own copy.
pub(crate) struct WatchStream {
    shared: Arc<Shared>,
    id: usize,
    info: Arc<ResourceInfo>,
    namespace: Option<String>,
    selector: Selector,
    bookmarks: bool,
    cursor: u64,
    initial: Option<std::vec::IntoIter<Arc<StoredObject>>>,
    initial_events_end: bool,
    deadline: Instant,
    next_bookmark: Instant,
    bookmark_due: bool,
    notify: watch::Receiver<u64>,
    close: watch::Receiver<u64>,
    done: bool,
}

impl WatchStream {
    pub(crate) fn new(shared: Arc<Shared>, req: WatchRequest) -> Self {
        let store = &shared.store;
        // Subscribe before reading anything so no write between the read and the wait goes unnoticed.
        let notify = store.subscribe(req.id);
        let close = shared.close_tx.subscribe();
        let (initial, cursor) = match req.from {
            Some(rv) => (None, rv),
            None => {
                let (items, rv) = store.snapshot(req.id, req.namespace.as_deref());
                (Some(items.into_iter()), rv)
            }
        };
        let now = Instant::now();
        Self {
            info: store.info(req.id),
            id: req.id,
            namespace: req.namespace,
            selector: req.selector,
            bookmarks: req.bookmarks,
            cursor,
            initial,
            initial_events_end: req.initial_events_end && req.bookmarks,
            deadline: now + req.timeout,
            next_bookmark: now + shared.bookmark_interval(),
            bookmark_due: false,
            notify,
            close,
            done: false,
            shared,
        }
    }

    /// The next chunk of the response, or `None` when the watch ends.
    pub(crate) async fn next_chunk(mut self) -> Option<(Result<Frame<Bytes>, Infallible>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(chunk) = self.initial_chunk() {
                return Some((Ok(Frame::data(chunk)), self));
            }
            if Instant::now() >= self.deadline {
                return None;
            }
            self.notify.borrow_and_update();
            let (events, seen) = match self.shared.store.events_after(self.id, self.cursor, BATCH) {
                Ok(x) => x,
                Err(err) => {
                    tracing::debug!(resource = %self.info.plural, cursor = self.cursor, "watch expired: {err}");
                    self.done = true;
                    return Some((Ok(Frame::data(error_line(&err))), self));
                }
            };
            self.cursor = seen;
            let mut buf = BytesMut::new();
            for e in &events {
                self.render(e, &mut buf);
            }
            if !buf.is_empty() {
                return Some((Ok(Frame::data(buf.freeze())), self));
            }
            if events.len() == BATCH {
                continue;
            }
            if self.bookmark_due {
                self.bookmark_due = false;
                self.next_bookmark = Instant::now() + self.shared.bookmark_interval();
                let line = bookmark_line(&self.info, self.cursor, false);
                return Some((Ok(Frame::data(line)), self));
            }
            let bookmarks = self.bookmarks;
            let next_bookmark = self.next_bookmark;
            tokio::select! {
                changed = self.notify.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    }
                }
                _ = self.close.changed() => {
                    tracing::debug!(resource = %self.info.plural, "watch closed by close_watches()");
                    self.done = true;
                }
                _ = tokio::time::sleep_until(self.deadline) => self.done = true,
                _ = tokio::time::sleep_until(next_bookmark), if bookmarks => self.bookmark_due = true,
            }
        }
    }

    /// Initial ADDED events in chunks; ends with the `initial-events-end` bookmark when asked for.
    fn initial_chunk(&mut self) -> Option<Bytes> {
        let iter = self.initial.as_mut()?;
        let mut buf = BytesMut::new();
        while buf.len() < CHUNK {
            match iter.next() {
                Some(obj) => {
                    if self.selector.matches(&obj) {
                        event_line(&mut buf, EventType::Added, &obj.json);
                    }
                }
                None => {
                    self.initial = None;
                    if self.initial_events_end {
                        buf.extend_from_slice(&bookmark_line(&self.info, self.cursor, true));
                    }
                    break;
                }
            }
        }
        // The loop only stops early once the buffer is full, so an empty buffer means the initial state is done.
        if buf.is_empty() { None } else { Some(buf.freeze()) }
    }

    /// Appends the line (if any) this event means for this watch's namespace and selectors.
    fn render(&self, e: &Event, buf: &mut BytesMut) {
        if self.namespace.as_ref().is_some_and(|ns| *ns != e.object.key.0) {
            return;
        }
        if self.selector.is_empty() {
            event_line(buf, e.ty, &e.object.json);
            return;
        }
        let now = self.selector.matches(&e.object);
        match e.ty {
            EventType::Added | EventType::Deleted => {
                if now {
                    event_line(buf, e.ty, &e.object.json);
                }
            }
            EventType::Modified => {
                let before = e.prev.as_ref().is_some_and(|p| self.selector.matches(p));
                match (before, now) {
                    (true, true) => event_line(buf, EventType::Modified, &e.object.json),
                    (false, true) => event_line(buf, EventType::Added, &e.object.json),
                    // Stopped matching: upstream sends DELETED with the previous state at the event's revision.
                    (true, false) => {
                        if let Some(prev) = &e.prev {
                            event_line(buf, EventType::Deleted, &restamp(&prev.json, e.rv));
                        }
                    }
                    (false, false) => {}
                }
            }
        }
    }
}

/// `json` with `metadata.resourceVersion` replaced.
fn restamp(json: &[u8], rv: u64) -> Bytes {
    match serde_json::from_slice::<Value>(json) {
        Ok(mut v) => {
            v["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        Err(_) => Bytes::copy_from_slice(json),
    }
}

fn event_line(buf: &mut BytesMut, ty: EventType, object: &[u8]) {
    buf.reserve(object.len() + 32);
    buf.put_slice(b"{\"type\":\"");
    buf.put_slice(ty.as_str().as_bytes());
    buf.put_slice(b"\",\"object\":");
    buf.put_slice(object);
    buf.put_slice(b"}\n");
}

/// A BOOKMARK line; `initial_end` marks the end of `sendInitialEvents` as upstream does.
pub(crate) fn bookmark_line(info: &ResourceInfo, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = serde_json::json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = serde_json::json!({"k8s.io/initial-events-end": "true"});
    }
    let line = serde_json::json!({
        "type": "BOOKMARK",
        "object": {"kind": info.kind, "apiVersion": info.api_version(), "metadata": metadata},
    });
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// An ERROR line carrying a `Status`.
pub(crate) fn error_line(err: &ApiError) -> Bytes {
    let line = serde_json::json!({"type": "ERROR", "object": err.status_json()});
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}
