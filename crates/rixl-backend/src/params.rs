//! Backend parameters declared once, as a table.
//!
//! A backend used to state its parameters three times: a string table for
//! `get_plugin_params`, a table in its crate docs, and `unwrap_or` defaults where it parsed
//! them (after the agent had already merged the defaults in). Now it declares one
//! `&'static [ParamSpec]`; from it come the defaults `get_plugin_params` reports, the
//! validation `create_backend` runs (an unknown name is refused with the list of valid ones, a
//! malformed value with the expected form), typed access for the backend
//! ([`ParsedParams`]), and the Markdown table its crate docs carry (a unit test of each backend
//! checks that the docs match [`markdown_table`]).

use std::net::SocketAddr;

use rixl_core::{Error, Params, Result};

/// What values a parameter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParamKind {
    /// A non-negative integer in `min..=max`.
    Int {
        /// Smallest value accepted.
        min: u64,
        /// Largest value accepted.
        max: u64,
    },
    /// A boolean in NIXL's syntax: `y yes on 1 true enable` / `n no off 0 false disable`.
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// `IP:port`.
    SocketAddr,
    /// Any text (a path, a UCX configuration string).
    Text,
    /// Reported by the backend's effective parameters but configures nothing; accepted back so
    /// that one backend's parameters can create another unchanged.
    ReportOnly,
}

impl ParamKind {
    /// The expected form, for error messages and docs.
    pub fn expected(&self) -> String {
        match self {
            ParamKind::Int { min, max } if *max == u64::MAX => format!("an integer ≥ {min}"),
            ParamKind::Int { min, max } => format!("an integer in {min}..={max}"),
            ParamKind::Bool => "a boolean (true/false, yes/no, on/off, 1/0)".to_owned(),
            ParamKind::Choice(words) => format!("one of {}", words.join(", ")),
            ParamKind::SocketAddr => "an IP:port address".to_owned(),
            ParamKind::Text => "any text".to_owned(),
            ParamKind::ReportOnly => "reported only (any value is ignored)".to_owned(),
        }
    }

    /// Checks `value` against this kind.
    fn check(&self, value: &str) -> bool {
        let v = value.trim();
        match self {
            ParamKind::Int { min, max } => {
                v.parse::<u64>().is_ok_and(|n| (*min..=*max).contains(&n))
            }
            ParamKind::Bool => parse_bool(v).is_some(),
            ParamKind::Choice(words) => words.contains(&v),
            ParamKind::SocketAddr => v.parse::<SocketAddr>().is_ok(),
            ParamKind::Text | ParamKind::ReportOnly => true,
        }
    }
}

/// One declared parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Its name, e.g. `"num_threads"`.
    pub name: &'static str,
    /// What values it takes.
    pub kind: ParamKind,
    /// Its default, as `get_plugin_params` reports it (must be valid for `kind`).
    pub default: &'static str,
    /// One line saying what it does.
    pub doc: &'static str,
}

impl ParamSpec {
    /// A parameter (for `const` tables).
    pub const fn new(
        name: &'static str,
        kind: ParamKind,
        default: &'static str,
        doc: &'static str,
    ) -> ParamSpec {
        ParamSpec {
            name,
            kind,
            default,
            doc,
        }
    }
}

/// NIXL's boolean syntax (NIXL-API §3.11).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "on" | "1" | "true" | "enable" => Some(true),
        "n" | "no" | "off" | "0" | "false" | "disable" => Some(false),
        _ => None,
    }
}

/// The defaults of a table, as `get_plugin_params` reports them (report-only entries are not
/// parameters one sets, so they are left out).
pub fn defaults(table: &[ParamSpec]) -> Params {
    table
        .iter()
        .filter(|p| p.kind != ParamKind::ReportOnly)
        .map(|p| (p.name.to_owned(), p.default.to_owned()))
        .collect()
}

/// Merges `given` over the defaults of `backend`'s `table` and validates every value. Unknown
/// names and malformed values are refused with `InvalidParam`, naming the valid names or the
/// expected form.
pub fn validate(backend: &str, table: &[ParamSpec], given: &Params) -> Result<ParsedParams> {
    let mut merged = defaults(table);
    for (k, v) in given {
        let Some(spec) = table.iter().find(|p| p.name == k) else {
            let valid: Vec<&str> = table.iter().map(|p| p.name).collect();
            return Err(Error::invalid_param(if valid.is_empty() {
                format!("backend {backend} takes no parameters (got {k:?})")
            } else {
                format!(
                    "backend {backend} has no parameter {k:?} (valid: {})",
                    valid.join(", ")
                )
            }));
        };
        if !spec.kind.check(v) {
            return Err(Error::invalid_param(format!(
                "backend {backend} parameter {k}={v:?} is not valid: expected {}",
                spec.kind.expected()
            )));
        }
        merged.insert(k.clone(), v.trim().to_owned());
    }
    Ok(ParsedParams {
        backend: backend.to_owned(),
        table: table.to_vec(),
        values: merged,
    })
}

/// Validated parameters with typed access. Every declared name has a value (the caller's or
/// the default), and every value has the declared form.
#[derive(Clone, Debug)]
pub struct ParsedParams {
    backend: String,
    table: Vec<ParamSpec>,
    values: Params,
}

impl ParsedParams {
    /// The effective values, defaults included.
    pub fn values(&self) -> &Params {
        &self.values
    }

    fn raw(&self, name: &str) -> &str {
        debug_assert!(
            self.table.iter().any(|p| p.name == name),
            "parameter {name} of backend {} is not declared",
            self.backend
        );
        self.values.get(name).map_or("", String::as_str)
    }

    /// An integer parameter (0 if `name` is not a declared integer: a bug the debug build
    /// reports).
    pub fn int(&self, name: &str) -> u64 {
        self.raw(name).parse().unwrap_or_default()
    }

    /// A boolean parameter.
    pub fn bool(&self, name: &str) -> bool {
        parse_bool(self.raw(name)).unwrap_or_default()
    }

    /// A text or choice parameter.
    pub fn text(&self, name: &str) -> &str {
        self.raw(name)
    }

    /// A socket-address parameter (`0.0.0.0:0` if `name` is not one).
    pub fn socket_addr(&self, name: &str) -> SocketAddr {
        self.raw(name)
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Whether the caller set `name` explicitly (not left to the default).
    pub fn is_default(&self, name: &str) -> bool {
        self.table
            .iter()
            .find(|p| p.name == name)
            .is_some_and(|p| self.raw(name) == p.default)
    }

    /// An `InvalidParam` error about `name`, for checks across parameters.
    pub fn invalid(&self, name: &str, why: &str) -> Error {
        Error::invalid_param(format!(
            "backend {} parameter {name}={:?} is not valid: {why}",
            self.backend,
            self.raw(name)
        ))
    }
}

/// The table as Markdown (`| Parameter | Default | Values | What it does |`), for crate docs.
pub fn markdown_table(table: &[ParamSpec]) -> String {
    let mut s =
        String::from("| Parameter | Default | Values | What it does |\n|---|---|---|---|\n");
    for p in table {
        let default = if p.default.is_empty() {
            "(empty)".to_owned()
        } else {
            format!("`{}`", p.default)
        };
        s.push_str(&format!(
            "| `{}` | {default} | {} | {} |\n",
            p.name,
            p.kind.expected(),
            p.doc
        ));
    }
    s
}

/// Checks that a crate's documentation contains its parameter table exactly as
/// [`markdown_table`] renders it (each line prefixed as in `//!` docs). Returns a description
/// of the first difference. Backends call it through [`params_doc_test!`].
pub fn docs_match(table: &[ParamSpec], source: &str) -> std::result::Result<(), String> {
    let doc: String = source
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let want = markdown_table(table);
    if doc.contains(want.trim_end()) {
        Ok(())
    } else {
        Err(format!(
            "the crate docs do not contain the parameter table; paste this into them:\n{}",
            want.lines()
                .map(|l| format!("//! {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

/// Expands into a unit test checking that the crate docs of the calling crate (its `lib.rs`)
/// contain the table [`markdown_table`] renders for `$params`; on failure it prints the table
/// to paste. Use it at the root of a backend crate: `rixl_backend::params_doc_test!(PARAMS);`.
#[macro_export]
macro_rules! params_doc_test {
    ($params:expr) => {
        #[cfg(test)]
        #[test]
        fn crate_docs_list_the_declared_parameters() {
            if let Err(e) = $crate::docs_match($params, include_str!("lib.rs")) {
                panic!("{e}");
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[ParamSpec] = &[
        ParamSpec::new(
            "threads",
            ParamKind::Int { min: 1, max: 64 },
            "4",
            "Worker threads.",
        ),
        ParamSpec::new("direct", ParamKind::Bool, "false", "Use O_DIRECT."),
        ParamSpec::new("mode", ParamKind::Choice(&["fast", "safe"]), "safe", "How."),
        ParamSpec::new("addr", ParamKind::SocketAddr, "0.0.0.0:0", "Where."),
    ];

    fn given(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_merge_and_typed_access() {
        let p = validate("X", TABLE, &given(&[("threads", " 8 "), ("direct", "yes")])).unwrap();
        assert_eq!(p.int("threads"), 8);
        assert!(p.bool("direct"));
        assert_eq!(p.text("mode"), "safe");
        assert!(p.is_default("mode") && !p.is_default("threads"));
        assert_eq!(p.socket_addr("addr").port(), 0);
        assert_eq!(p.values().len(), 4);
    }

    #[test]
    fn unknown_names_and_bad_values_are_refused_with_the_valid_forms() {
        let e = validate("X", TABLE, &given(&[("thread", "8")])).unwrap_err();
        assert_eq!(e.kind(), rixl_core::ErrorKind::InvalidParam);
        let m = e.to_string();
        assert!(
            m.contains("\"thread\"") && m.contains("valid: threads, direct, mode, addr"),
            "{m}"
        );
        for (k, v, want) in [
            ("threads", "0", "1..=64"),
            ("threads", "many", "1..=64"),
            ("direct", "maybe", "boolean"),
            ("mode", "quick", "fast, safe"),
            ("addr", "localhost", "IP:port"),
        ] {
            let m = validate("X", TABLE, &given(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(m.contains(want) && m.contains(k), "{k}={v}: {m}");
        }
        let m = validate("Y", &[], &given(&[("a", "1")]))
            .unwrap_err()
            .to_string();
        assert!(m.contains("takes no parameters"), "{m}");
    }

    #[test]
    fn every_default_is_valid_and_docs_are_checked() {
        for p in TABLE {
            assert!(p.kind.check(p.default), "{}", p.name);
        }
        let table = markdown_table(TABLE);
        let src: String = table.lines().map(|l| format!("//! {l}\n")).collect();
        assert!(docs_match(TABLE, &src).is_ok());
        assert!(docs_match(TABLE, "//! nothing").is_err());
    }
}
