//! The built-in backends this build offers (NIXL's plugin list, but static: RIXL backends are
//! crates linked in by feature, so there is no plugin directory to scan and nothing that can
//! fail to load at run time).

use rixl_backend::BackendFactory;
use rixl_core::Params;

/// Every backend this build can create, in the order `get_plugin_list` reports them.
pub fn factories() -> &'static [BackendFactory] {
    static FACTORIES: &[BackendFactory] = &[
        crate::loopback::FACTORY,
        #[cfg(feature = "shm")]
        rixl_shm::FACTORY,
        #[cfg(feature = "tcp")]
        rixl_tcp::FACTORY,
        #[cfg(feature = "posix")]
        rixl_posix::FACTORY,
    ];
    FACTORIES
}

/// The factory for `name`, if this build has that backend.
pub fn factory(name: &str) -> Option<&'static BackendFactory> {
    factories().iter().find(|f| f.name == name)
}

/// Names of the available backends.
pub fn available() -> Vec<&'static str> {
    factories().iter().map(|f| f.name).collect()
}

/// Advertised parameters of a backend and their defaults.
pub fn default_params(f: &BackendFactory) -> Params {
    f.default_params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
