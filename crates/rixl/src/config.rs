//! Agent configuration and the `NIXL_*` / `RIXL_*` environment rules.

use rixl_core::Params;

/// How an [`Agent`](crate::Agent) is set up.
///
/// `AgentConfig::default()` creates no backend; name the ones you want with
/// [`AgentConfig::backend`] or create them later with
/// [`Agent::create_backend`](crate::Agent::create_backend).
#[derive(Clone, Debug, Default)]
pub struct AgentConfig {
    /// Backends created by the constructor, in preference order, with their parameters.
    pub backends: Vec<(String, Params)>,
    /// Record per-request telemetry. `NIXL_TELEMETRY_ENABLE` overrides this at construction.
    pub capture_telemetry: bool,
    /// Let backends run progress threads (accepted for NIXL compatibility; RIXL's networked
    /// backends always own their progress).
    pub progress_thread: bool,
    /// Accept overlapping registrations as NIXL does (default: refuse them).
    /// `RIXL_ALLOW_OVERLAPPING_REGISTRATIONS` overrides this at construction.
    pub allow_overlapping_registrations: bool,
}

impl AgentConfig {
    /// Adds a backend to create at construction, with default parameters.
    pub fn backend(mut self, name: &str) -> AgentConfig {
        self.backends.push((name.to_owned(), Params::new()));
        self
    }

    /// Adds a backend to create at construction, with parameters.
    pub fn backend_with(mut self, name: &str, params: Params) -> AgentConfig {
        self.backends.push((name.to_owned(), params));
        self
    }

    /// Turns per-request telemetry on or off.
    pub fn telemetry(mut self, on: bool) -> AgentConfig {
        self.capture_telemetry = on;
        self
    }

    /// Applies the environment: `NIXL_TELEMETRY_ENABLE`, `RIXL_ALLOW_OVERLAPPING_REGISTRATIONS`.
    pub(crate) fn with_env(mut self) -> AgentConfig {
        if let Some(v) = env_bool("NIXL_TELEMETRY_ENABLE") {
            self.capture_telemetry = v;
        }
        if let Some(v) = env_bool("RIXL_ALLOW_OVERLAPPING_REGISTRATIONS") {
            self.allow_overlapping_registrations = v;
        }
        self
    }
}

/// Parses NIXL's boolean syntax: `y yes on 1 true enable` / `n no off 0 false disable`,
/// case-insensitive. Anything else is `None`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "on" | "1" | "true" | "enable" => Some(true),
        "n" | "no" | "off" | "0" | "false" | "disable" => Some(false),
        _ => None,
    }
}

/// A boolean environment variable; an unparsable value is ignored with a warning.
pub fn env_bool(name: &str) -> Option<bool> {
    let v = std::env::var(name).ok()?;
    let parsed = parse_bool(&v);
    if parsed.is_none() {
        tracing::warn!(
            "ignoring {name}={v:?}: not a boolean (use yes/no, on/off, 1/0, true/false)"
        );
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::parse_bool;

    #[test]
    fn booleans() {
        for t in ["y", "YES", "On", "1", "true", "enable"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["n", "No", "OFF", "0", "false", "Disable"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        assert_eq!(parse_bool("2"), None);
    }
}
