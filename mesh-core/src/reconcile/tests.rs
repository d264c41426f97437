//! The load-balancing reconciler against FakeLb and FaultyLb.

use super::*;
use backend_state::{ACTIVE, DRAINING};

const WEB: SvcAddr = SvcAddr {
    vip: Ipv4Addr::new(10, 43, 0, 10),
    port: 80,
    proto: 6,
};
const DNS: SvcAddr = SvcAddr {
    vip: Ipv4Addr::new(10, 43, 0, 20),
    port: 53,
    proto: 17,
};

type Row = ((Ipv4Addr, u16), DesiredBackend);

fn be(last: u8, state: u8) -> Row {
    (
        (Ipv4Addr::new(10, 42, 0, last), 8080),
        DesiredBackend {
            state,
            ifindex: last as u32,
            mac: [2, 0, 0, 0, 0, last],
        },
    )
}

fn desired(services: &[(SvcAddr, &[Row])]) -> Desired {
    services
        .iter()
        .map(|(a, bs)| (*a, bs.iter().copied().collect()))
        .collect()
}

/// Plans and applies against a fake; returns the plan.
fn pass(d: &Desired, actual: &mut Actual, fake: &mut FakeLb) -> Plan {
    let p = plan(d, actual);
    apply(&p, fake, actual).expect("fake writes succeed");
    p
}

/// The fake's maps and `actual` agree (no phantom state).
fn same(actual: &Actual, fake: &FakeLb) {
    assert_eq!(actual.services, fake.services, "services");
    assert_eq!(actual.backends, fake.backends, "backends");
    assert_eq!(actual.rings, states(&fake.rings), "rings");
}

/// What `actual` keeps of the fake's rings.
fn states(rings: &BTreeMap<u32, Vec<u32>>) -> BTreeMap<u32, RingState> {
    rings.iter().map(|(k, r)| (*k, RingState::of(r))).collect()
}

fn ring_members(fake: &FakeLb, addr: SvcAddr) -> BTreeSet<Ipv4Addr> {
    let sid = fake.services[&addr];
    fake.rings
        .get(&sid)
        .into_iter()
        .flatten()
        .map(|id| Ipv4Addr::from(u32::from_be(fake.backends[id].ip_be)))
        .collect()
}

#[test]
fn from_nothing_then_nothing_to_do() {
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    let d = desired(&[
        (WEB, &[be(11, ACTIVE), be(12, ACTIVE), be(13, ACTIVE)]),
        (DNS, &[be(21, ACTIVE)]),
    ]);
    let p = pass(&d, &mut actual, &mut fake);
    assert_eq!(
        (
            p.set_backends.len(),
            p.set_rings.len(),
            p.add_services.len()
        ),
        (4, 2, 2)
    );
    same(&actual, &fake);
    assert_eq!(ring_members(&fake, WEB).len(), 3);
    let writes = fake.writes;
    assert!(plan(&d, &actual).is_empty(), "a second pass writes nothing");
    assert_eq!(fake.writes, writes);
}

#[test]
fn one_backend_leaves_minimal_writes() {
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE), be(13, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    let ids_before = actual.backends.clone();
    let p = pass(
        &desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    assert_eq!(p.writes(), 2, "one ring and one clear: {p:?}");
    assert!(p.set_backends.is_empty() && p.add_services.is_empty() && p.remove_services.is_empty());
    same(&actual, &fake);
    // Survivors keep their ids.
    for (id, b) in &actual.backends {
        assert_eq!(ids_before.get(id), Some(b));
    }
}

#[test]
fn draining_leaves_the_ring_but_keeps_the_backend() {
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    let p = pass(
        &desired(&[(WEB, &[be(11, ACTIVE), be(12, DRAINING)])]),
        &mut actual,
        &mut fake,
    );
    assert_eq!(
        (
            p.set_backends.len(),
            p.set_rings.len(),
            p.clear_backends.len()
        ),
        (1, 1, 0)
    );
    assert_eq!(
        ring_members(&fake, WEB),
        [Ipv4Addr::new(10, 42, 0, 11)].into()
    );
    assert_eq!(
        fake.backends.len(),
        2,
        "the draining backend stays for its flows"
    );
    same(&actual, &fake);
}

#[test]
fn removed_service_is_cleaned_up_and_its_id_reused_later() {
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE)]), (DNS, &[be(21, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    let dns_id = actual.services[&DNS];
    let p = pass(
        &desired(&[(WEB, &[be(11, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    assert_eq!(p.remove_services, vec![DNS]);
    assert_eq!(p.clear_backends.len(), 1);
    same(&actual, &fake);
    assert_eq!(fake.services.len(), 1);
    let other = SvcAddr { port: 443, ..WEB };
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE)]), (other, &[be(31, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    assert_eq!(
        actual.services[&other], dns_id,
        "a freed service id is reused in a later pass"
    );
    same(&actual, &fake);
}

#[test]
fn failed_writes_leave_no_phantom_state_and_are_retried() {
    let d = desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE)])]);
    for failing in ["set_backend", "set_rings", "set_service"] {
        let mut actual = Actual::default();
        let mut faulty = FaultyLb {
            fail: Some(failing),
            ..FaultyLb::default()
        };
        let p = plan(&d, &actual);
        let e = apply(&p, &mut faulty, &mut actual).expect_err("injected failure");
        assert!(e.to_string().contains("injected"), "{e}");
        same(&actual, &faulty.inner);
        assert!(
            faulty.inner.services.is_empty(),
            "{failing}: no service without its ring and backends"
        );
        faulty.fail = None;
        let p = plan(&d, &actual);
        apply(&p, &mut faulty, &mut actual).expect("retry succeeds");
        same(&actual, &faulty.inner);
        assert_eq!(
            ring_members(&faulty.inner, WEB).len(),
            2,
            "{failing}: complete after retry"
        );
        assert!(plan(&d, &actual).is_empty());
    }
}

#[test]
fn one_failing_service_does_not_hold_back_the_others() {
    let d = desired(&[
        (WEB, &[be(11, ACTIVE), be(12, ACTIVE)]),
        (DNS, &[be(21, ACTIVE)]),
    ]);
    // The first plan gives WEB service id 1 (it sorts first).
    let mut actual = Actual::default();
    let p = plan(&d, &actual);
    let web_id = p
        .add_services
        .iter()
        .find(|(a, _)| *a == WEB)
        .map(|(_, id)| *id)
        .expect("web");
    let mut faulty = FaultyLb {
        fail_ring_of: Some(web_id),
        ..FaultyLb::default()
    };
    let e = apply(&p, &mut faulty, &mut actual).expect_err("web's ring fails");
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(e.to_string().contains(&format!("service {web_id}")), "{e}");
    same(&actual, &faulty.inner);
    assert_eq!(ring_members(&faulty.inner, DNS).len(), 1, "dns is served");
    assert!(faulty.inner.services.contains_key(&DNS));
    assert!(
        !faulty.inner.services.contains_key(&WEB),
        "web waits for its ring"
    );
    // A backend that cannot be written holds back only its ring.
    let mut actual = Actual::default();
    let p = plan(&d, &actual);
    let (dns_backend, _) = p
        .set_backends
        .iter()
        .find(|(_, b)| b.ip_be == u32::from(Ipv4Addr::new(10, 42, 0, 21)).to_be())
        .expect("dns backend");
    let mut faulty = FaultyLb {
        fail_backend: Some(*dns_backend),
        ..FaultyLb::default()
    };
    let e = apply(&p, &mut faulty, &mut actual).expect_err("a backend fails");
    assert_eq!(e.0.len(), 1, "{e}");
    same(&actual, &faulty.inner);
    assert_eq!(ring_members(&faulty.inner, WEB).len(), 2, "web is served");
    assert!(!faulty.inner.services.contains_key(&DNS));
    // Once the fault is gone, the next pass completes both.
    faulty.fail_backend = None;
    let p = plan(&d, &actual);
    apply(&p, &mut faulty, &mut actual).expect("retry succeeds");
    same(&actual, &faulty.inner);
    assert!(plan(&d, &actual).is_empty());
}

#[test]
fn only_rings_whose_members_changed_are_built_again() {
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    let d = desired(&[(WEB, &[be(11, ACTIVE)]), (DNS, &[be(21, ACTIVE)])]);
    let p = pass(&d, &mut actual, &mut fake);
    assert_eq!(p.built_from.len(), 2, "both built the first time");
    assert!(plan(&d, &actual).built_from.is_empty(), "nothing changed");
    // One backend more for WEB: only WEB's ring is built.
    let d2 = desired(&[
        (WEB, &[be(11, ACTIVE), be(12, ACTIVE)]),
        (DNS, &[be(21, ACTIVE)]),
    ]);
    let p = pass(&d2, &mut actual, &mut fake);
    let web = actual.services[&WEB];
    assert_eq!(
        p.built_from.iter().map(|b| b.sid).collect::<Vec<_>>(),
        vec![web]
    );
    same(&actual, &fake);
    assert_eq!(ring_members(&fake, WEB).len(), 2);
    // Rings adopted from the kernel are built once, then remembered.
    let mut adopted = Actual {
        ring_members: BTreeMap::new(),
        ..actual.clone()
    };
    let p = plan(&d2, &adopted);
    assert!(p.is_empty(), "the same rings: no writes");
    assert_eq!(p.built_from.len(), 2);
    apply(&p, &mut fake, &mut adopted).expect("apply");
    assert!(plan(&d2, &adopted).built_from.is_empty());
}

#[test]
fn a_freed_backend_id_is_not_reused_in_the_same_pass() {
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    let old_id = *actual.backends.keys().next().expect("one backend");
    let p = plan(&desired(&[(WEB, &[be(12, ACTIVE)])]), &actual);
    assert_eq!(p.clear_backends, vec![old_id]);
    assert!(p.set_backends.iter().all(|(id, _)| *id != old_id), "{p:?}");
}

#[test]
fn adoption_removes_what_went_stale() {
    // A restarted agent reads the maps: a service whose containers died
    // while it was down, plus a ring and a backend nobody owns.
    let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE)]), (DNS, &[be(21, ACTIVE)])]),
        &mut actual,
        &mut fake,
    );
    fake.rings.insert(40, vec![7; 3]);
    fake.backends.insert(
        7,
        Backend {
            state: ACTIVE,
            service_id: 40,
            ..Backend::default()
        },
    );
    let mut adopted = Actual {
        services: fake.services.clone(),
        backends: fake.backends.clone(),
        rings: states(&fake.rings),
        ..Actual::default()
    };
    let web_id = adopted.services[&WEB];
    pass(
        &desired(&[(WEB, &[be(11, ACTIVE)])]),
        &mut adopted,
        &mut fake,
    );
    same(&adopted, &fake);
    assert_eq!(fake.services.keys().copied().collect::<Vec<_>>(), vec![WEB]);
    assert_eq!(fake.services[&WEB], web_id, "adopted ids are kept");
    assert_eq!(fake.rings.keys().copied().collect::<Vec<_>>(), vec![web_id]);
    assert_eq!(fake.backends.len(), 1);
}

#[test]
fn a_rings_fingerprint_tells_any_slot_changed_or_moved() {
    for len in (1..40).chain([1021, 65_521]) {
        let ring: Vec<u32> = (0..len).map(|i| (i * 7 % 5 + 1) as u32).collect();
        let fp = super::fingerprint(&ring);
        assert_eq!(fp, RingState::of(&ring).fingerprint);
        let mut seen = std::collections::BTreeSet::from([fp]);
        let mut slots = vec![0, len / 2, len - 1];
        slots.dedup();
        for slot in slots {
            let mut other = ring.clone();
            other[slot] += 10;
            assert!(
                seen.insert(super::fingerprint(&other)),
                "{len}: slot {slot}"
            );
        }
        if len > 1 && ring[0] != ring[len - 1] {
            let mut swapped = ring.clone();
            swapped.swap(0, len - 1);
            assert!(seen.insert(super::fingerprint(&swapped)), "{len}: swapped");
        }
        // A ring one slot longer with the same ids is another ring.
        let mut longer = ring.clone();
        longer.push(0);
        assert!(seen.insert(super::fingerprint(&longer)), "{len}: longer");
    }
}
