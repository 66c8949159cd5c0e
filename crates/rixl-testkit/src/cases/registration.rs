//! Capabilities, registration and deregistration (NIXL-API §2.5 "Memory", §3.2, §4 #9).

use rixl::{Agent, ErrorKind, MemType, RegDesc, RegDescList, INIT_AGENT};

use super::*;

/// What an instance reports is what its factory declares (the harness reads the latter), and
/// is coherent: plugin data, effective parameters; unknown backend names are `NotFound`.
pub fn capabilities_match_harness(h: &dyn Harness) {
    let a = agent(h, "caps");
    let name = h.backend();
    let caps = a
        .backend_capabilities(name)
        .unwrap_or_else(|e| panic!("backend_capabilities({name}): {e}"));
    assert_eq!(
        caps,
        h.capabilities(),
        "the instance of {name} reports other capabilities than the harness reads"
    );
    assert_eq!(
        Agent::plugin_capabilities(name).expect("plugin_capabilities"),
        caps,
        "{name}: factory and instance disagree"
    );
    assert!(
        caps.supports(MemType::Dram),
        "the suite moves DRAM; {name} does not support it"
    );
    if caps.remote {
        assert!(
            caps.notif,
            "a remote-capable backend must carry notifications"
        );
    }
    for (l, t) in &caps.moves {
        assert!(
            caps.supports(*l) && caps.supports(*t),
            "{name} moves {l} to {t} but cannot register both"
        );
    }
    assert_eq!(a.backends(), vec![name.to_owned()]);
    assert!(
        Agent::available_backends().contains(&name),
        "{name} is not in the plugin list"
    );
    let mems = Agent::plugin_mem_types(name).expect("plugin_mem_types");
    assert!(mems.contains(&MemType::Dram));
    let effective = a.backend_params(name).expect("backend_params");
    let advertised = Agent::plugin_params(name).expect("plugin_params");
    for k in advertised.keys().chain(h.params().keys()) {
        assert!(
            effective.contains_key(k),
            "effective parameters of {name} lack {k:?} (advertised or passed): {effective:?}"
        );
    }
    expect_err(
        a.backend_capabilities("NO_SUCH_BACKEND"),
        ErrorKind::NotFound,
        "capabilities of a backend not created",
    );
    expect_err(
        a.backend_params("NO_SUCH_BACKEND"),
        ErrorKind::NotFound,
        "params of a backend not created",
    );
    expect_err(
        Agent::plugin_params("NO_SUCH_BACKEND"),
        ErrorKind::NotFound,
        "plugin params of an unknown backend",
    );
    expect_err(
        Agent::plugin_mem_types("NO_SUCH_BACKEND"),
        ErrorKind::NotFound,
        "plugin mem types of an unknown backend",
    );
}

/// Registered memory can be prepared; exact deregistration removes it (several at once too);
/// a region can be registered again after deregistration.
pub fn register_deregister_exact_match(h: &dyn Harness) {
    let b1 = TestBuffer::new(64 * 1024);
    let b2 = TestBuffer::new(8 * 1024);
    let a = agent(h, "reg");
    reg(&a, &[&b1, &b2]);
    let d1 = xlist(vec![b1.desc(100, 1000)]);
    let d2 = xlist(vec![b2.whole()]);
    a.prep_xfer_dlist(INIT_AGENT, &d1, &[])
        .expect("registered memory prepares");
    a.deregister_mem(&b1.reg_list(), &[])
        .expect("exact deregistration");
    expect_err(
        a.prep_xfer_dlist(INIT_AGENT, &d1, &[]),
        ErrorKind::NotFound,
        "prep of deregistered memory",
    );
    a.prep_xfer_dlist(INIT_AGENT, &d2, &[])
        .expect("the other registration is untouched");
    reg(&a, &[&b1]);
    a.prep_xfer_dlist(INIT_AGENT, &d1, &[])
        .expect("registered again");
    a.deregister_mem(&reg_list(&[&b1, &b2]), &[])
        .expect("deregistering two at once");
    expect_err(
        a.prep_xfer_dlist(INIT_AGENT, &d2, &[]),
        ErrorKind::NotFound,
        "prep after deregistering both",
    );
    smoke(h, &a);
}

/// Deregistration needs the exact `(addr, len, dev)`: sub-ranges, shifted, larger, other-device
/// and repeated deregistrations are `NotFound`, and a refused call changes nothing.
pub fn deregister_sub_range_and_twice_not_found(h: &dyn Harness) {
    let buf = TestBuffer::new(16 * 1024);
    let never = TestBuffer::new(4096);
    let a = agent(h, "dereg");
    reg(&a, &[&buf]);
    let (addr, len) = (buf.addr(), buf.len() as u64);
    let one = |d: RegDesc| RegDescList::from_descs(MemType::Dram, vec![d]);
    for (what, d) in [
        ("sub-range", RegDesc::new(addr, 4096, 0)),
        ("shifted", RegDesc::new(addr + 4096, len - 4096, 0)),
        ("larger", RegDesc::new(addr, len + 4096, 0)),
        ("other device", RegDesc::new(addr, len, 1)),
        ("never registered", never.reg_desc()),
    ] {
        expect_err(
            a.deregister_mem(&one(d), &[]),
            ErrorKind::NotFound,
            &format!("deregistering a {what} range"),
        );
    }
    let mixed = RegDescList::from_descs(
        MemType::Dram,
        vec![buf.reg_desc(), RegDesc::new(addr, 4096, 0)],
    );
    expect_err(
        a.deregister_mem(&mixed, &[]),
        ErrorKind::NotFound,
        "deregistering an exact and a sub-range descriptor together",
    );
    a.prep_xfer_dlist(INIT_AGENT, &xlist(vec![buf.whole()]), &[])
        .expect("a refused deregistration leaves the registration in place");
    expect_err(
        a.deregister_mem(&buf.reg_list(), &["NO_SUCH_BACKEND"]),
        ErrorKind::NotFound,
        "deregistering from a backend not created",
    );
    a.deregister_mem(&buf.reg_list(), &[])
        .expect("exact deregistration");
    expect_err(
        a.deregister_mem(&buf.reg_list(), &[]),
        ErrorKind::NotFound,
        "second deregistration",
    );
    smoke(h, &a);
}

/// Overlapping registrations are refused with `InvalidParam` naming both ranges, within one
/// list and against existing ones; a refused call registers nothing. Adjacent is fine.
pub fn overlapping_registration_invalid_param(h: &dyn Harness) {
    let buf = TestBuffer::new(16 * 1024);
    let buf2 = TestBuffer::new(16 * 1024);
    let fresh = TestBuffer::new(4096);
    let a = agent(h, "overlap");
    let addr = buf.addr();
    try_reg(&a, &reg_pieces(&[(&buf, 0, 8192)])).expect("first half");
    let e = expect_err(
        try_reg(&a, &reg_pieces(&[(&buf, 4096, 8192)])),
        ErrorKind::InvalidParam,
        "a registration overlapping an existing one",
    );
    let msg = e.to_string();
    for r in [addr, addr + 4096] {
        assert!(
            msg.contains(&format!("{r:#x}")),
            "the error names both ranges ({r:#x} missing): {msg}"
        );
    }
    for (what, o, l) in [
        ("contained", 1024, 1024),
        ("duplicate", 0, 8192),
        ("covering", 0, 16 * 1024),
        ("straddling the end", 8191, 2),
    ] {
        expect_err(
            try_reg(&a, &reg_pieces(&[(&buf, o, l)])),
            ErrorKind::InvalidParam,
            &format!("a {what} overlapping registration"),
        );
    }
    try_reg(&a, &reg_pieces(&[(&buf, 8192, 8192)])).expect("an adjacent registration");
    expect_err(
        try_reg(&a, &reg_pieces(&[(&buf2, 0, 8192), (&buf2, 4096, 8192)])),
        ErrorKind::InvalidParam,
        "overlapping entries in one list",
    );
    expect_err(
        a.deregister_mem(&reg_pieces(&[(&buf2, 0, 8192)]), &[]),
        ErrorKind::NotFound,
        "a refused list registered nothing",
    );
    expect_err(
        try_reg(&a, &reg_pieces(&[(&fresh, 0, 4096), (&buf, 0, 4096)])),
        ErrorKind::InvalidParam,
        "a list whose second entry overlaps",
    );
    expect_err(
        a.deregister_mem(&fresh.reg_list(), &[]),
        ErrorKind::NotFound,
        "the valid first entry of a refused list was not registered",
    );
    smoke(h, &a);
}

/// Zero-length, wrapping and null-address DRAM registrations are `InvalidParam`, and refuse the
/// whole list.
pub fn invalid_dram_registrations(h: &dyn Harness) {
    let buf = TestBuffer::new(4096);
    let a = agent(h, "badreg");
    let one = |d: RegDesc| RegDescList::from_descs(MemType::Dram, vec![d]);
    for (what, d) in [
        ("zero-length", RegDesc::new(buf.addr(), 0, 0)),
        ("wrapping", RegDesc::new(u64::MAX - 100, 4096, 0)),
        ("null-address", RegDesc::new(0, 4096, 0)),
    ] {
        expect_err(
            try_reg(&a, &one(d.clone())),
            ErrorKind::InvalidParam,
            &format!("a {what} DRAM registration"),
        );
        let mixed = RegDescList::from_descs(MemType::Dram, vec![buf.reg_desc(), d]);
        expect_err(
            try_reg(&a, &mixed),
            ErrorKind::InvalidParam,
            &format!("a list holding a {what} registration"),
        );
        expect_err(
            a.deregister_mem(&buf.reg_list(), &[]),
            ErrorKind::NotFound,
            "the valid entry of a refused list was not registered",
        );
    }
    smoke(h, &a);
}

/// An empty registration list is `InvalidParam` (RIXL's choice; NIXL's Python layer refuses it
/// earlier), an unknown backend name is `NotFound`, and so is a memory type no created backend
/// supports.
pub fn registration_argument_errors(h: &dyn Harness) {
    let buf = TestBuffer::new(4096);
    let a = agent(h, "regargs");
    let bare = bare_agent("regargs-bare");
    expect_err(
        try_reg(&a, &RegDescList::new(MemType::Dram)),
        ErrorKind::InvalidParam,
        "an empty registration list",
    );
    expect_err(
        try_reg_with(&a, &buf.reg_list(), &["NO_SUCH_BACKEND"]),
        ErrorKind::NotFound,
        "registering with a backend not created",
    );
    expect_err(
        try_reg(&bare, &buf.reg_list()),
        ErrorKind::NotFound,
        "registering on an agent without backends",
    );
    try_reg_with(&a, &buf.reg_list(), &[h.backend()]).expect("registering with the backend named");
    dereg(&a, &[&buf]);
    smoke(h, &a);
}
