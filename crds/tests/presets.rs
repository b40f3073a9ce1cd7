//! The presets are exactly the port lists of the seed `portsentry.conf`: the active ones
//! (classic) and the two commented alternatives (aware, bare-bones), read from the fixture.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use portsentry_crds::{Preset, expand, parse_port_list};

const FIXTURE: &str = include_str!("../../tests/fixtures/seed-portsentry.conf");

/// The `KEY="..."` values of the fixture in file order, commented or not, as port lists.
fn lists(key: &str) -> Vec<Vec<u16>> {
    FIXTURE
        .lines()
        .map(|line| line.trim_start_matches('#').trim())
        .filter_map(|line| line.strip_prefix(key)?.trim_start().strip_prefix('='))
        .map(|value| {
            let ranges = parse_port_list(value.trim().trim_matches('"')).unwrap();
            ranges.iter().flat_map(|range| range.ports()).collect()
        })
        .collect()
}

#[test]
fn the_fixture_has_three_tcp_and_three_udp_lists() {
    assert_eq!(lists("TCP_PORTS").len(), 3);
    assert_eq!(lists("UDP_PORTS").len(), 3);
}

#[test]
fn presets_equal_the_fixture_lists_in_order() {
    let (tcp, udp) = (lists("TCP_PORTS"), lists("UDP_PORTS"));
    for (index, preset) in Preset::ALL.into_iter().enumerate() {
        assert_eq!(preset.tcp(), tcp[index].as_slice(), "{preset:?} TCP");
        assert_eq!(preset.udp(), udp[index].as_slice(), "{preset:?} UDP");
    }
}

#[test]
fn preset_lists_hold_no_duplicates() {
    for preset in Preset::ALL {
        let tcp: Vec<_> = preset
            .tcp()
            .iter()
            .map(|p| portsentry_crds::PortRange::single(*p).unwrap())
            .collect();
        assert_eq!(expand(&tcp).len(), preset.tcp().len(), "{preset:?}");
    }
}

#[test]
fn presets_serialise_with_their_documented_names() {
    let names: Vec<String> = Preset::ALL
        .iter()
        .map(|p| serde_json::to_string(p).unwrap())
        .collect();
    assert_eq!(names, [r#""classic""#, r#""aware""#, r#""bareBones""#]);
}
