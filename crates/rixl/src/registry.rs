//! The backends this process can create: the built-in ones (crates linked in by feature, so
//! nothing can fail to load at run time) and any added with [`add_factory`], such as a backend
//! from a crate outside this workspace. NIXL scans a plugin directory instead; a Rust program
//! links its backends, and registering a factory is the run-time step that remains.

use std::sync::RwLock;

use rixl_backend::BackendFactory;
use rixl_core::{Error, Result};

fn builtin() -> &'static [BackendFactory] {
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

static ADDED: RwLock<Vec<BackendFactory>> = RwLock::new(Vec::new());

/// Every backend this process can create, in the order `get_plugin_list` reports them.
pub fn factories() -> Vec<BackendFactory> {
    let mut all = builtin().to_vec();
    all.extend(
        ADDED
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied(),
    );
    all
}

/// The factory for `name`, if this process has that backend.
pub fn factory(name: &str) -> Option<BackendFactory> {
    builtin()
        .iter()
        .copied()
        .find(|f| f.name() == name)
        .or_else(|| {
            ADDED
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied()
                .find(|f| f.name() == name)
        })
}

/// Names of the available backends.
pub fn available() -> Vec<&'static str> {
    factories().iter().map(|f| f.name()).collect()
}

/// Makes `factory` creatable by name in this process, by every agent (`create_backend`,
/// Python's `create_backend`, `get_plugin_list`). A name already taken is refused with
/// `InvalidParam`.
pub fn add_factory(factory: BackendFactory) -> Result<()> {
    let mut added = ADDED.write().unwrap_or_else(|e| e.into_inner());
    if builtin()
        .iter()
        .chain(added.iter())
        .any(|f| f.name() == factory.name())
    {
        return Err(Error::invalid_param(format!(
            "a backend named {:?} is already available",
            factory.name()
        )));
    }
    if factory.name().is_empty() {
        return Err(Error::invalid_param("a backend name must not be empty"));
    }
    added.push(factory);
    Ok(())
}
