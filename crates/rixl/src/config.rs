//! Agent configuration and the `NIXL_*` / `RIXL_*` environment rules.

use rixl_core::Params;

/// How an [`Agent`](crate::Agent) is set up.
///
/// `AgentConfig::default()` creates no backend; name the ones you want with
/// [`AgentConfig::backend`] or create them later with
/// [`Agent::create_backend`](crate::Agent::create_backend).
#[derive(Clone)]
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
    /// Run the metadata listener (NIXL's `enable_listen_thread`).
    pub listen: bool,
    /// Listener port; 0 lets the OS choose (see `Agent::listen_addr`). NIXL's default is 8888.
    pub listen_port: u16,
    /// Listener bind address; `None` binds every interface as NIXL does.
    /// `RIXL_LISTEN_ADDR` overrides this at construction.
    pub listen_addr: Option<std::net::IpAddr>,
    /// Shared secret authenticating every listener frame (all agents must use the same one).
    /// `RIXL_SHARED_SECRET` overrides this at construction.
    pub shared_secret: Option<Vec<u8>>,
    /// How long `deregister_mem` (and dropping the agent) waits for posts in flight that use
    /// the regions before it gives up with `Timeout`, leaving them registered. Default 10 s.
    pub deregister_timeout: std::time::Duration,
    /// Bounds on received notifications not yet drained; beyond them peers' notifications are
    /// dropped, counted ([`Agent::dropped_notifs`](crate::Agent::dropped_notifs)) and logged
    /// once per sender. Default: 2^20 notifications, 256 MiB.
    pub notif_limits: rixl_core::NotifLimits,
}

/// The default [`AgentConfig::deregister_timeout`].
pub const DEFAULT_DEREGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            backends: Vec::new(),
            capture_telemetry: false,
            progress_thread: false,
            allow_overlapping_registrations: false,
            listen: false,
            listen_port: 0,
            listen_addr: None,
            shared_secret: None,
            deregister_timeout: DEFAULT_DEREGISTER_TIMEOUT,
            notif_limits: rixl_core::NotifLimits::default(),
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("backends", &self.backends)
            .field("capture_telemetry", &self.capture_telemetry)
            .field("progress_thread", &self.progress_thread)
            .field(
                "allow_overlapping_registrations",
                &self.allow_overlapping_registrations,
            )
            .field("listen", &self.listen)
            .field("listen_port", &self.listen_port)
            .field("listen_addr", &self.listen_addr)
            .field(
                "shared_secret",
                &self.shared_secret.as_ref().map(|_| "<set>"),
            )
            .field("deregister_timeout", &self.deregister_timeout)
            .field("notif_limits", &self.notif_limits)
            .finish()
    }
}

impl AgentConfig {
    /// Runs the metadata listener on `port` (0: the OS chooses).
    pub fn listen_on(mut self, port: u16) -> AgentConfig {
        self.listen = true;
        self.listen_port = port;
        self
    }

    /// Sets the shared secret for listener frames.
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> AgentConfig {
        self.shared_secret = Some(secret.into());
        self
    }

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

    /// Sets how long deregistration waits for posts in flight (see
    /// [`AgentConfig::deregister_timeout`]).
    pub fn deregister_timeout(mut self, timeout: std::time::Duration) -> AgentConfig {
        self.deregister_timeout = timeout;
        self
    }

    /// Sets the bounds on received notifications not yet drained
    /// ([`AgentConfig::notif_limits`]).
    pub fn notif_limits(mut self, limits: rixl_core::NotifLimits) -> AgentConfig {
        self.notif_limits = limits;
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
        if let Ok(v) = std::env::var("RIXL_LISTEN_ADDR") {
            match v.parse() {
                Ok(ip) => self.listen_addr = Some(ip),
                Err(_) => tracing::warn!("ignoring RIXL_LISTEN_ADDR={v:?}: not an IP address"),
            }
        }
        if let Ok(v) = std::env::var("RIXL_SHARED_SECRET") {
            if !v.is_empty() {
                self.shared_secret = Some(v.into_bytes());
            }
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
