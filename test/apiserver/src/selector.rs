//! Label and field selectors with the Kubernetes string syntax.

use serde_json::Value;

use crate::store::StoredObject;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`: all requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<LabelReq>,
}

/// A parse error of a selector string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {input:?}: {reason}")]
pub struct SelectorError {
    input: String,
    reason: String,
}

impl SelectorError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self { input: input.to_string(), reason: reason.into() }
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_label_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_set(input: &str, rest: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::new(input, "expected a parenthesised set"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

impl LabelSelector {
    /// Parses `key`, `!key`, `key=v`, `key==v`, `key!=v`, `key in (a,b)`, `key notin (a,b)`, joined by commas.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for part in split_top_level(input) {
            let part = part.trim();
            if part.is_empty() {
                return Err(SelectorError::new(input, "empty requirement"));
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::NotIn(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some((k, v)) = part.split_once("==") {
                LabelReq::In(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some((k, v)) = part.split_once('=') {
                LabelReq::In(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(input, rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(input, rest)?)
            } else {
                LabelReq::Exists(part.to_string())
            };
            let key = match &req {
                LabelReq::Exists(k) | LabelReq::NotExists(k) | LabelReq::In(k, _) | LabelReq::NotIn(k, _) => k,
            };
            if !valid_label_key(key) {
                return Err(SelectorError::new(input, format!("invalid label key {key:?}")));
            }
            reqs.push(req);
        }
        Ok(Self { reqs })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Evaluates against labels sorted by key.
    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        let get = |k: &str| labels.binary_search_by(|(lk, _)| lk.as_str().cmp(k)).ok().map(|i| labels[i].1.as_str());
        self.reqs.iter().all(|r| match r {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        })
    }
}

/// One field requirement: dotted JSON path compared with a string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`: generic dotted-path (in)equality on the object JSON, all must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<FieldReq>,
}

/// Removes the backslash escapes the apiserver allows in field selector values.
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits on commas not preceded by a backslash.
fn split_unescaped(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0usize, false);
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            ',' if !escaped => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
    }
    parts.push(&s[start..]);
    parts
}

impl FieldSelector {
    /// Parses `path=v`, `path==v`, `path!=v`, joined by commas.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for part in split_unescaped(input) {
            let (path, value, equal) = if let Some((p, v)) = part.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, v, true)
            } else {
                return Err(SelectorError::new(input, format!("{part:?} is not of the form path=value")));
            };
            let path = path.trim();
            if path.is_empty() {
                return Err(SelectorError::new(input, "empty field path"));
            }
            reqs.push(FieldReq { path: path.to_string(), value: unescape(value.trim()), equal });
        }
        Ok(Self { reqs })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether evaluating needs the object body (anything but name and namespace).
    fn needs_body(&self) -> bool {
        self.reqs.iter().any(|r| r.path != "metadata.name" && r.path != "metadata.namespace")
    }

    /// The value a path resolves to; missing and null fields read as the empty string, as upstream.
    fn lookup(obj: &Value, path: &str) -> String {
        let mut cur = obj;
        for seg in path.split('.') {
            match cur.get(seg) {
                Some(v) => cur = v,
                None => return String::new(),
            }
        }
        match cur {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }

    /// Evaluates against a stored object, parsing its body only when a requirement needs it.
    pub(crate) fn matches(&self, obj: &StoredObject) -> bool {
        if self.reqs.is_empty() {
            return true;
        }
        let body = if self.needs_body() { serde_json::from_slice::<Value>(&obj.json).ok() } else { None };
        self.reqs.iter().all(|r| {
            let actual = match r.path.as_str() {
                "metadata.name" => obj.key.1.clone(),
                "metadata.namespace" => obj.key.0.clone(),
                p => body.as_ref().map(|b| Self::lookup(b, p)).unwrap_or_default(),
            };
            (actual == r.value) == r.equal
        })
    }
}

/// Label and field selector together.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selector {
    pub(crate) fn matches(&self, obj: &StoredObject) -> bool {
        self.labels.matches(&obj.labels) && self.fields.matches(obj)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        v.sort();
        v
    }

    #[test]
    fn label_selector_forms() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
        assert!(ok("app"));
        assert!(!ok("!app"));
        assert!(ok("!other"));
        assert!(ok("app=web"));
        assert!(ok("app==web"));
        assert!(!ok("app!=web"));
        assert!(ok("other!=x"));
        assert!(ok("app in (db, web)"));
        assert!(!ok("app notin (db,web)"));
        assert!(ok("other notin (db,web)"));
        assert!(ok("app=web,tier in (fe)"));
        assert!(!ok("app=web,tier in (be)"));
        assert!(ok(""));
        assert!(ok("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"));
        assert!(LabelSelector::parse("a=b,,c").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selector_paths() {
        let obj = serde_json::json!({"metadata": {"name": "n"}, "spec": {"clusterIP": "None", "port": 80}});
        let lookup = |p: &str| FieldSelector::lookup(&obj, p);
        assert_eq!(lookup("spec.clusterIP"), "None");
        assert_eq!(lookup("spec.port"), "80");
        assert_eq!(lookup("spec.missing"), "");
        let fs = FieldSelector::parse("spec.clusterIP!=None,metadata.name=n").unwrap();
        assert_eq!(fs.reqs.len(), 2);
        assert!(!fs.reqs[0].equal);
        assert_eq!(FieldSelector::parse(r"a=x\,y").unwrap().reqs[0].value, "x,y");
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
