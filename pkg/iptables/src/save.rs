//! A small parser for `iptables-save` output: tables → chains (with policy) → rules (`-A CHAIN ...` lines).
//!
//! It keeps each rule's text exactly as saved so a caller can feed it back as `-D CHAIN <spec>` in an
//! `iptables-restore --noflush` transaction, and tokenizes it (quotes removed) so callers can look at the target.

use crate::runner::Error;

/// The whole `iptables-save` dump of one family, tables in the order they were printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// The tables, in output order.
    pub tables: Vec<TableDump>,
}

/// One `*table` ... `COMMIT` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDump {
    /// The table name (`filter`, `nat`, `mangle`, `raw`, `security`).
    pub name: String,
    /// The chains, in declaration order (built-in chains first, as iptables-save prints them).
    pub chains: Vec<ChainDump>,
}

/// One chain declaration (`:NAME POLICY [packets:bytes]`) and the rules appended to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainDump {
    /// The chain name.
    pub name: String,
    /// The policy of a built-in chain (`ACCEPT`, `DROP`); `None` for a user-defined chain (printed as `-`).
    pub policy: Option<String>,
    /// The chain's rules, in order.
    pub rules: Vec<Rule>,
}

/// One `-A CHAIN ...` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// The chain the rule is appended to.
    pub chain: String,
    /// The rule text after `-A CHAIN `, exactly as saved (quotes kept), usable as `-D CHAIN <spec>`.
    pub spec: String,
    /// `spec` split into arguments the way iptables-restore splits it (quotes and escapes removed).
    pub args: Vec<String>,
}

impl Rule {
    /// The chain or target this rule jumps (`-j`/`--jump`) or goes (`-g`/`--goto`) to, if any.
    pub fn target(&self) -> Option<&str> {
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // Skip comment values so a comment that happens to read "-j X" is never taken for a target.
                "--comment" => {
                    args.next();
                }
                "-j" | "--jump" | "-g" | "--goto" => return args.next().map(String::as_str),
                _ => {}
            }
        }
        None
    }

    /// The full restore line that appends this rule (`-A CHAIN spec`).
    pub fn append_line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }

    /// The restore line that deletes this rule by its spec (`-D CHAIN spec`).
    pub fn delete_line(&self) -> String {
        format!("-D {} {}", self.chain, self.spec)
    }
}

impl ChainDump {
    /// Whether this is a built-in chain (it has a policy), e.g. `INPUT` or `PREROUTING`.
    pub fn is_builtin(&self) -> bool {
        self.policy.is_some()
    }
}

impl TableDump {
    /// The chain called `name`, if declared in this table.
    pub fn chain(&self, name: &str) -> Option<&ChainDump> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Whether a chain called `name` is declared in this table.
    pub fn has_chain(&self, name: &str) -> bool {
        self.chain(name).is_some()
    }

    /// The chains whose names start with `prefix`.
    pub fn chains_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a ChainDump> + 'a {
        self.chains.iter().filter(move |c| c.name.starts_with(prefix))
    }

    /// Every rule, in any chain of this table, that jumps or goes to `target`.
    pub fn rules_jumping_to<'a>(&'a self, target: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules().filter(move |r| r.target() == Some(target))
    }

    /// Every rule of this table, chain by chain.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.chains.iter().flat_map(|c| c.rules.iter())
    }
}

impl Ruleset {
    /// Parses `iptables-save` (or `ip6tables-save`) output, with or without `-c` counters.
    pub fn parse(text: &str) -> Result<Ruleset, Error> {
        let mut tables: Vec<TableDump> = Vec::new();
        // Index of the table being read; None between COMMIT and the next `*table`.
        let mut current: Option<usize> = None;
        // Chain name -> position in the current table: tens of thousands of chains make linear lookups quadratic.
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (idx, raw) in text.lines().enumerate() {
            let lineno = idx + 1;
            let bad = |reason: &str| Error::Parse { line: lineno, text: raw.to_string(), reason: reason.to_string() };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if current.is_some() {
                    return Err(bad("table started before the previous one was committed"));
                }
                tables.push(TableDump { name: name.trim().to_string(), chains: Vec::new() });
                current = Some(tables.len() - 1);
                index.clear();
                continue;
            }
            let Some(ti) = current else {
                return Err(bad("line outside a *table ... COMMIT section"));
            };
            let table = &mut tables[ti];
            if line == "COMMIT" {
                current = None;
            } else if let Some(decl) = line.strip_prefix(':') {
                let mut parts = decl.split_whitespace();
                let name = parts.next().ok_or_else(|| bad("chain declaration without a name"))?;
                let policy = parts.next().ok_or_else(|| bad("chain declaration without a policy"))?;
                if index.insert(name.to_string(), table.chains.len()).is_some() {
                    return Err(bad("chain declared twice"));
                }
                table.chains.push(ChainDump {
                    name: name.to_string(),
                    policy: (policy != "-").then(|| policy.to_string()),
                    rules: Vec::new(),
                });
            } else {
                // With `iptables-save -c` a rule starts with its counters: `[packets:bytes] -A ...`.
                let rest = match line.strip_prefix('[') {
                    Some(r) => r.split_once(']').ok_or_else(|| bad("unterminated counters"))?.1.trim_start(),
                    None => line,
                };
                let rest = rest.strip_prefix("-A ").ok_or_else(|| bad("expected `-A CHAIN ...`"))?;
                let (chain, spec) = match rest.trim_start().split_once(char::is_whitespace) {
                    Some((c, s)) => (c, s.trim()),
                    None => (rest.trim(), ""),
                };
                let args = split_args(spec).map_err(bad)?;
                let at = *index.get(chain).ok_or_else(|| bad("rule appended to an undeclared chain"))?;
                let chain_dump = &mut table.chains[at];
                chain_dump.rules.push(Rule { chain: chain.to_string(), spec: spec.to_string(), args });
            }
        }
        if let Some(ti) = current {
            return Err(Error::Parse {
                line: text.lines().count(),
                text: format!("*{}", tables[ti].name),
                reason: "table not terminated by COMMIT".to_string(),
            });
        }
        Ok(Ruleset { tables })
    }

    /// The table called `name`, if it was in the dump.
    pub fn table(&self, name: &str) -> Option<&TableDump> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// Splits a rule spec the way iptables-restore does: whitespace-separated, double quotes group, and a backslash
/// escapes the next character inside quotes.
pub fn split_args(spec: &str) -> Result<Vec<String>, &'static str> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut in_quotes = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                in_word = true;
            }
            '\\' if in_quotes => {
                cur.push(chars.next().ok_or("dangling backslash")?);
            }
            c if c.is_whitespace() && !in_quotes => {
                if in_word {
                    args.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_quotes {
        return Err("unterminated quote");
    }
    if in_word {
        args.push(cur);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANNED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 23 06:18:45 2026
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
# Completed on Mon Nov 23 06:18:45 2026
*nat
:PREROUTING ACCEPT [10:600]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
[5:300] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SVC-ABCDEFGHIJKLMNOP -m comment --comment "say \"-j NOPE\"" -j MARK --or-mark 0x4000
COMMIT
*filter
:INPUT DROP [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -m comment --comment kubernetes -g KUBE-FORWARD
COMMIT
"#;

    #[test]
    fn parses_tables_chains_policies_and_rules() {
        let rs = Ruleset::parse(CANNED).unwrap();
        let names: Vec<_> = rs.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["mangle", "nat", "filter"]);

        let nat = rs.table("nat").unwrap();
        assert_eq!(nat.chain("PREROUTING").unwrap().policy.as_deref(), Some("ACCEPT"));
        assert!(nat.chain("PREROUTING").unwrap().is_builtin());
        assert!(!nat.chain("KUBE-SERVICES").unwrap().is_builtin());
        assert_eq!(rs.table("filter").unwrap().chain("INPUT").unwrap().policy.as_deref(), Some("DROP"));

        let pre = &nat.chain("PREROUTING").unwrap().rules[0];
        assert_eq!(pre.spec, r#"-m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#);
        assert_eq!(pre.args[3], "kubernetes service portals");
        assert_eq!(pre.target(), Some("KUBE-SERVICES"));
        assert_eq!(pre.delete_line(), format!("-D PREROUTING {}", pre.spec));
    }

    #[test]
    fn finds_chains_by_prefix_and_jumps() {
        let rs = Ruleset::parse(CANNED).unwrap();
        let nat = rs.table("nat").unwrap();
        let svc: Vec<_> = nat.chains_with_prefix("KUBE-SVC-").map(|c| c.name.as_str()).collect();
        assert_eq!(svc, ["KUBE-SVC-ABCDEFGHIJKLMNOP"]);
        let jumps: Vec<_> = nat.rules_jumping_to("KUBE-SVC-ABCDEFGHIJKLMNOP").map(|r| r.chain.as_str()).collect();
        assert_eq!(jumps, ["KUBE-SERVICES"]);
        // A goto counts as a jump.
        let filter = rs.table("filter").unwrap();
        assert_eq!(filter.rules_jumping_to("KUBE-FORWARD").count(), 1);
    }

    #[test]
    fn comment_text_is_never_a_target() {
        let rs = Ruleset::parse(CANNED).unwrap();
        let rule = &rs.table("nat").unwrap().chain("KUBE-SVC-ABCDEFGHIJKLMNOP").unwrap().rules[0];
        assert_eq!(rule.args[3], r#"say "-j NOPE""#);
        assert_eq!(rule.target(), Some("MARK"));
        assert_eq!(rs.table("nat").unwrap().rules_jumping_to("NOPE").count(), 0);
    }

    #[test]
    fn empty_and_comment_only_input() {
        assert_eq!(Ruleset::parse("").unwrap(), Ruleset::default());
        assert_eq!(Ruleset::parse("# nothing\n\n").unwrap(), Ruleset::default());
    }

    #[test]
    fn rejects_malformed_input_naming_the_line() {
        let err = Ruleset::parse("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-NOPE -j ACCEPT\nCOMMIT\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("-A KUBE-NOPE -j ACCEPT"), "{msg}");

        assert!(Ruleset::parse("*nat\n:OUTPUT ACCEPT [0:0]\n").unwrap_err().to_string().contains("COMMIT"));
        assert!(Ruleset::parse(":OUTPUT ACCEPT [0:0]\n").is_err());
        assert!(Ruleset::parse("*nat\n:X - [0:0]\n-A X --comment \"open\nCOMMIT\n").is_err());
    }

    #[test]
    fn splits_like_iptables_restore() {
        assert_eq!(
            split_args(r#"-m comment --comment "a b" -j X"#).unwrap(),
            ["-m", "comment", "--comment", "a b", "-j", "X"]
        );
        assert_eq!(split_args(r#"--comment "" -j X"#).unwrap(), ["--comment", "", "-j", "X"]);
        assert_eq!(split_args(r#""a\\b\"c""#).unwrap(), [r#"a\b"c"#]);
        assert!(split_args("").unwrap().is_empty());
    }
}
