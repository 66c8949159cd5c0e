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
    match h.target_mem() {
        Some(t) => {
            assert!(
                caps.can_move(MemType::Dram, t),
                "the harness's target memory is {t}, but {name} does not move DRAM to {t}"
            );
            assert!(
                crate::target_mem::SUPPORTED_TARGETS.contains(&t),
                "the suite cannot make {t} target memory"
            );
        }
        None => skip(
            h,
            "capabilities_match_harness (target memory)",
            "the backend moves DRAM to no memory type the suite can make, so every case that \
             moves data is skipped",
        ),
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
/// a region can be registered again after deregistration. DRAM, and the target memory type
/// when it is another one.
pub fn register_deregister_exact_match(h: &dyn Harness) {
    for mem in reg_mems(h) {
        let b1 = TargetMem::of(mem, 64 * 1024);
        let b2 = TargetMem::of(mem, 8 * 1024);
        let a = agent(h, "reg");
        reg(&a, &[&b1, &b2]);
        let d1 = xlist_of(mem, vec![b1.desc(100, 1000)]);
        let d2 = xlist_of(mem, vec![b2.whole()]);
        a.prep_xfer_dlist(INIT_AGENT, &d1, &[])
            .unwrap_or_else(|e| panic!("{mem}: registered memory prepares: {e}"));
        a.deregister_mem(&b1.reg_list(), &[])
            .unwrap_or_else(|e| panic!("{mem}: exact deregistration: {e}"));
        expect_err(
            a.prep_xfer_dlist(INIT_AGENT, &d1, &[]),
            ErrorKind::NotFound,
            &format!("{mem}: prep of deregistered memory"),
        );
        a.prep_xfer_dlist(INIT_AGENT, &d2, &[])
            .unwrap_or_else(|e| panic!("{mem}: the other registration is untouched: {e}"));
        reg(&a, &[&b1]);
        a.prep_xfer_dlist(INIT_AGENT, &d1, &[])
            .unwrap_or_else(|e| panic!("{mem}: registered again: {e}"));
        a.deregister_mem(&reg_list(&[&b1, &b2]), &[])
            .unwrap_or_else(|e| panic!("{mem}: deregistering two at once: {e}"));
        expect_err(
            a.prep_xfer_dlist(INIT_AGENT, &d2, &[]),
            ErrorKind::NotFound,
            &format!("{mem}: prep after deregistering both"),
        );
        smoke(h, &a);
    }
}

/// Deregistration needs the exact `(addr, len, dev)`: sub-ranges, shifted, larger, other-device
/// and repeated deregistrations are `NotFound`, and a refused call changes nothing. DRAM, and
/// the target memory type when it is another one.
pub fn deregister_sub_range_and_twice_not_found(h: &dyn Harness) {
    for mem in reg_mems(h) {
        let buf = TargetMem::of(mem, 16 * 1024);
        let never = TargetMem::of(mem, 4096);
        let a = agent(h, "dereg");
        reg(&a, &[&buf]);
        let len = buf.len();
        let one = |d: RegDesc| RegDescList::from_descs(mem, vec![d]);
        let mut other_dev = buf.reg_desc();
        other_dev.desc.dev = 1;
        for (what, d) in [
            ("sub-range", buf.reg_range(0, 4096)),
            ("shifted", buf.reg_range(4096, len - 4096)),
            ("larger", buf.reg_range(0, len + 4096)),
            ("other device", other_dev),
            ("never registered", never.reg_desc()),
        ] {
            expect_err(
                a.deregister_mem(&one(d), &[]),
                ErrorKind::NotFound,
                &format!("{mem}: deregistering a {what} range"),
            );
        }
        let mixed = RegDescList::from_descs(mem, vec![buf.reg_desc(), buf.reg_range(0, 4096)]);
        expect_err(
            a.deregister_mem(&mixed, &[]),
            ErrorKind::NotFound,
            &format!("{mem}: deregistering an exact and a sub-range descriptor together"),
        );
        a.prep_xfer_dlist(INIT_AGENT, &xlist_of(mem, vec![buf.whole()]), &[])
            .unwrap_or_else(|e| {
                panic!("{mem}: a refused deregistration leaves the registration in place: {e}")
            });
        expect_err(
            a.deregister_mem(&buf.reg_list(), &["NO_SUCH_BACKEND"]),
            ErrorKind::NotFound,
            &format!("{mem}: deregistering from a backend not created"),
        );
        a.deregister_mem(&buf.reg_list(), &[])
            .unwrap_or_else(|e| panic!("{mem}: exact deregistration: {e}"));
        expect_err(
            a.deregister_mem(&buf.reg_list(), &[]),
            ErrorKind::NotFound,
            &format!("{mem}: second deregistration"),
        );
        smoke(h, &a);
    }
}

/// Overlapping registrations are refused with `InvalidParam` naming both ranges, within one
/// list and against existing ones; a refused call registers nothing. Adjacent is fine. DRAM,
/// and the target memory type when it is another one (offsets of one file).
pub fn overlapping_registration_invalid_param(h: &dyn Harness) {
    for mem in reg_mems(h) {
        let buf = TargetMem::of(mem, 16 * 1024);
        let buf2 = TargetMem::of(mem, 16 * 1024);
        let fresh = TargetMem::of(mem, 4096);
        let a = agent(h, "overlap");
        let addr = buf.desc(0, 1).addr;
        try_reg(&a, &reg_pieces(&[(&buf, 0, 8192)])).expect("first half");
        let e = expect_err(
            try_reg(&a, &reg_pieces(&[(&buf, 4096, 8192)])),
            ErrorKind::InvalidParam,
            &format!("{mem}: a registration overlapping an existing one"),
        );
        let msg = e.to_string();
        for r in [addr, addr + 4096] {
            assert!(
                msg.contains(&format!("{r:#x}")),
                "{mem}: the error names both ranges ({r:#x} missing): {msg}"
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
                &format!("{mem}: a {what} overlapping registration"),
            );
        }
        try_reg(&a, &reg_pieces(&[(&buf, 8192, 8192)])).expect("an adjacent registration");
        expect_err(
            try_reg(&a, &reg_pieces(&[(&buf2, 0, 8192), (&buf2, 4096, 8192)])),
            ErrorKind::InvalidParam,
            &format!("{mem}: overlapping entries in one list"),
        );
        expect_err(
            a.deregister_mem(&reg_pieces(&[(&buf2, 0, 8192)]), &[]),
            ErrorKind::NotFound,
            &format!("{mem}: a refused list registered nothing"),
        );
        expect_err(
            try_reg(&a, &reg_pieces(&[(&fresh, 0, 4096), (&buf, 0, 4096)])),
            ErrorKind::InvalidParam,
            &format!("{mem}: a list whose second entry overlaps"),
        );
        expect_err(
            a.deregister_mem(&fresh.reg_list(), &[]),
            ErrorKind::NotFound,
            &format!("{mem}: the valid first entry of a refused list was not registered"),
        );
        smoke(h, &a);
    }
}

/// Zero-length, wrapping and null-address DRAM registrations are `InvalidParam`, and refuse the
/// whole list. When the target memory is storage (which addresses offsets, so offset 0 is
/// valid and length 0 means "to the end"), a wrapping registration is `InvalidParam` and
/// refuses its list, and a zero-length one is accepted as unbounded.
pub fn invalid_dram_registrations(h: &dyn Harness) {
    let buf = TestBuffer::new(4096);
    let file = match h.target_mem() {
        Some(m) if m.is_storage() => Some(TargetMem::of(m, 4096)),
        _ => None,
    };
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
    if let Some(file) = &file {
        let mem = file.mem();
        let mut wrapping = file.reg_desc();
        wrapping.desc.addr = u64::MAX - 100;
        expect_err(
            try_reg(&a, &RegDescList::from_descs(mem, vec![wrapping.clone()])),
            ErrorKind::InvalidParam,
            &format!("a wrapping {mem} registration"),
        );
        expect_err(
            try_reg(
                &a,
                &RegDescList::from_descs(mem, vec![file.reg_desc(), wrapping]),
            ),
            ErrorKind::InvalidParam,
            &format!("a list holding a wrapping {mem} registration"),
        );
        expect_err(
            a.deregister_mem(&file.reg_list(), &[]),
            ErrorKind::NotFound,
            &format!("the valid {mem} entry of a refused list was not registered"),
        );
        let unbounded = RegDescList::from_descs(mem, vec![file.reg_range(0, 0)]);
        try_reg(&a, &unbounded)
            .unwrap_or_else(|e| panic!("a zero-length {mem} registration is unbounded: {e}"));
        a.prep_xfer_dlist(
            INIT_AGENT,
            &xlist_of(mem, vec![file.desc_unchecked(1 << 30, 4096)]),
            &[],
        )
        .unwrap_or_else(|e| panic!("an unbounded {mem} registration covers far offsets: {e}"));
        a.deregister_mem(&unbounded, &[])
            .unwrap_or_else(|e| panic!("deregistering the unbounded {mem} registration: {e}"));
    }
    smoke(h, &a);
}

/// An empty registration list is `InvalidParam` (RIXL's choice; NIXL's Python layer refuses it
/// earlier), an unknown backend name is `NotFound`, and so is a memory type no created backend
/// supports. DRAM, and the target memory type when it is another one.
pub fn registration_argument_errors(h: &dyn Harness) {
    for mem in reg_mems(h) {
        let buf = TargetMem::of(mem, 4096);
        let a = agent(h, "regargs");
        let bare = bare_agent("regargs-bare");
        expect_err(
            try_reg(&a, &RegDescList::new(mem)),
            ErrorKind::InvalidParam,
            &format!("an empty {mem} registration list"),
        );
        expect_err(
            try_reg_with(&a, &buf.reg_list(), &["NO_SUCH_BACKEND"]),
            ErrorKind::NotFound,
            &format!("registering {mem} with a backend not created"),
        );
        expect_err(
            try_reg(&bare, &buf.reg_list()),
            ErrorKind::NotFound,
            &format!("registering {mem} on an agent without backends"),
        );
        try_reg_with(&a, &buf.reg_list(), &[h.backend()])
            .unwrap_or_else(|e| panic!("registering {mem} with the backend named: {e}"));
        dereg(&a, &[&buf]);
        smoke(h, &a);
    }
}
