//! Banned sources as enforcement needs them: merged into the fewest CIDRs per address family,
//! and split into disjoint blocks of address space so that no object holds too many of them.

use std::collections::BTreeSet;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portsentry_crds::SourcePrefix;

/// The whole IPv4 space, `0.0.0.0/0`.
pub const ALL_V4: IpNet = IpNet::V4(Ipv4Net::new_assert(std::net::Ipv4Addr::UNSPECIFIED, 0));
/// The whole IPv6 space, `::/0`.
pub const ALL_V6: IpNet = IpNet::V6(Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 0));

/// Banned prefixes, merged and sorted, one list per address family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BannedPrefixes {
    pub v4: Vec<IpNet>,
    pub v6: Vec<IpNet>,
}

impl BannedPrefixes {
    /// Merges adjacent and overlapping sources into the minimal set of CIDRs.
    pub fn aggregate<'a>(sources: impl IntoIterator<Item = &'a SourcePrefix>) -> Self {
        let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = sources
            .into_iter()
            .map(SourcePrefix::network)
            .partition(|net| matches!(net, IpNet::V4(_)));
        Self {
            v4: sorted(IpNet::aggregate(&v4)),
            v6: sorted(IpNet::aggregate(&v6)),
        }
    }

    /// Number of CIDRs in both families.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// True when `address` falls inside a banned prefix.
    pub fn contains(&self, address: &std::net::IpAddr) -> bool {
        self.v4
            .iter()
            .chain(&self.v6)
            .any(|net| net.contains(address))
    }
}

fn sorted(mut nets: Vec<IpNet>) -> Vec<IpNet> {
    nets.sort();
    nets.dedup();
    nets
}

/// A block of address space allowed except for the banned prefixes inside it; becomes one
/// `ipBlock {cidr, except}` peer. Blocks of one shard plan never overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

/// Splits `space` into disjoint blocks holding at most `limit` bans each, covering `space`
/// minus the bans exactly. `bans` must be disjoint and inside `space` (as `aggregate` makes
/// them); a block that is banned entirely is left out, since `except` must be a strict subset.
pub fn partition(space: IpNet, bans: &[IpNet], limit: usize) -> Vec<Block> {
    let limit = limit.max(1);
    let mut blocks = Vec::new();
    partition_into(space, bans, limit, &mut blocks);
    blocks
}

fn partition_into(space: IpNet, bans: &[IpNet], limit: usize, blocks: &mut Vec<Block>) {
    let inside: Vec<IpNet> = bans
        .iter()
        .copied()
        .filter(|ban| space.contains(ban))
        .collect();
    // A ban covering the whole block (or more) leaves nothing of it to allow.
    if bans.iter().any(|ban| ban.contains(&space)) {
        return;
    }
    if inside.len() <= limit {
        blocks.push(Block {
            cidr: space,
            except: inside,
        });
        return;
    }
    // More than one disjoint ban lies strictly inside `space`, so it is not a host prefix
    // and halves exist.
    let Ok(halves) = space.subnets(space.prefix_len() + 1) else {
        blocks.push(Block {
            cidr: space,
            except: inside,
        });
        return;
    };
    for half in halves {
        partition_into(half, &inside, limit, blocks);
    }
}

/// Most `ipBlock` peers one generated object carries, whatever the prefix limit.
pub const MAX_BLOCKS_PER_OBJECT: usize = 256;

/// Plans the shards of one policy: each inner list becomes one object with at most `limit`
/// banned prefixes. Blocks are disjoint across all shards, so the union of what the shards
/// allow is exactly "everything except the bans".
pub fn shard(banned: &BannedPrefixes, limit: usize) -> Vec<Vec<Block>> {
    let limit = limit.max(1);
    let blocks = partition(ALL_V4, &banned.v4, limit)
        .into_iter()
        .chain(partition(ALL_V6, &banned.v6, limit));
    let mut shards: Vec<Vec<Block>> = Vec::new();
    let mut current: Vec<Block> = Vec::new();
    let mut weight = 0;
    for block in blocks {
        if !current.is_empty()
            && (weight + block.except.len() > limit || current.len() == MAX_BLOCKS_PER_OBJECT)
        {
            shards.push(std::mem::take(&mut current));
            weight = 0;
        }
        weight += block.except.len();
        current.push(block);
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The distinct banned prefixes of a plan, for checks and counts.
pub fn excepted(shards: &[Vec<Block>]) -> BTreeSet<IpNet> {
    shards
        .iter()
        .flatten()
        .flat_map(|block| block.except.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;

    fn prefixes(texts: &[&str]) -> Vec<SourcePrefix> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn adjacent_addresses_merge_into_one_prefix() {
        let banned = BannedPrefixes::aggregate(&prefixes(&[
            "203.0.113.4",
            "203.0.113.5",
            "203.0.113.6",
            "203.0.113.7",
        ]));
        assert_eq!(banned.v4, nets(&["203.0.113.4/30"]));
        assert!(banned.v6.is_empty());
    }

    #[test]
    fn a_prefix_swallows_the_addresses_inside_it() {
        let banned = BannedPrefixes::aggregate(&prefixes(&[
            "198.51.100.0/24",
            "198.51.100.9",
            "198.51.100.200",
        ]));
        assert_eq!(banned.v4, nets(&["198.51.100.0/24"]));
    }

    #[test]
    fn host_bits_of_a_prefix_are_cleared() {
        let banned = BannedPrefixes::aggregate(&prefixes(&["10.1.2.3/8"]));
        assert_eq!(banned.v4, nets(&["10.0.0.0/8"]));
    }

    #[test]
    fn ipv4_and_ipv6_are_kept_apart() {
        let banned =
            BannedPrefixes::aggregate(&prefixes(&["2001:db8::7", "192.0.2.1", "2001:db8::6"]));
        assert_eq!(banned.v4, nets(&["192.0.2.1/32"]));
        assert_eq!(banned.v6, nets(&["2001:db8::6/127"]));
        assert_eq!(banned.len(), 2);
    }

    #[test]
    fn few_bans_need_one_block_per_family() {
        let banned = BannedPrefixes::aggregate(&prefixes(&["192.0.2.1", "2001:db8::1"]));
        let plan = shard(&banned, 1000);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0][0].cidr, ALL_V4);
        assert_eq!(plan[0][0].except, nets(&["192.0.2.1/32"]));
        assert_eq!(plan[0][1].cidr, ALL_V6);
        assert_eq!(plan[0][1].except, nets(&["2001:db8::1/128"]));
    }

    #[test]
    fn a_ban_of_the_whole_space_leaves_that_family_out() {
        let banned = BannedPrefixes::aggregate(&prefixes(&["0.0.0.0/0"]));
        let plan = shard(&banned, 10);
        let cidrs: Vec<IpNet> = plan.iter().flatten().map(|b| b.cidr).collect();
        assert_eq!(cidrs, vec![ALL_V6]);
    }

    #[test]
    fn more_bans_than_the_limit_split_the_space_into_disjoint_blocks() {
        let banned = BannedPrefixes::aggregate(&prefixes(&[
            "1.0.0.1",
            "1.0.0.3",
            "130.0.0.1",
            "130.0.0.3",
            "200.0.0.1",
        ]));
        let blocks = partition(ALL_V4, &banned.v4, 2);
        assert!(blocks.iter().all(|b| b.except.len() <= 2));
        assert_eq!(blocks[0].cidr, "0.0.0.0/1".parse::<IpNet>().unwrap());
        for (i, a) in blocks.iter().enumerate() {
            for b in &blocks[i + 1..] {
                assert!(!a.cidr.contains(&b.cidr) && !b.cidr.contains(&a.cidr));
            }
        }
    }

    #[test]
    fn shards_never_hold_more_prefixes_than_the_limit() {
        let sources: Vec<SourcePrefix> = (0..5000u32)
            .map(|i| {
                SourcePrefix::host(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i * 2)))
            })
            .collect();
        let banned = BannedPrefixes::aggregate(&sources);
        let plan = shard(&banned, 700);
        assert!(plan.len() >= 8);
        for shard in &plan {
            assert!(shard.iter().map(|b| b.except.len()).sum::<usize>() <= 700);
        }
        assert_eq!(excepted(&plan).len(), 5000);
    }

    /// Half-open address ranges `[start, end)` of one family, as u128, for exact set algebra.
    fn range(net: &IpNet) -> (u128, u128) {
        let (start, bits) = match net {
            IpNet::V4(n) => (u128::from(u32::from(n.network())), 32),
            IpNet::V6(n) => (u128::from(n.network()), 128),
        };
        let size = 1u128
            .checked_shl(bits - u32::from(net.prefix_len()))
            .unwrap_or(0);
        (start, start.wrapping_add(size))
    }

    /// Sorted, merged ranges; a `0` end stands for the end of a 128-bit space.
    fn normalize(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
        ranges.sort();
        let mut out: Vec<(u128, u128)> = Vec::new();
        for (s, e) in ranges {
            match out.last_mut() {
                Some((_, last_end)) if *last_end != 0 && s <= *last_end => {
                    if e == 0 || e > *last_end {
                        *last_end = e;
                    }
                }
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// `outer` minus `holes`, where holes are disjoint and inside `outer`.
    fn subtract(outer: (u128, u128), holes: &[(u128, u128)]) -> Vec<(u128, u128)> {
        let mut holes = holes.to_vec();
        holes.sort();
        let mut out = Vec::new();
        let mut cursor = outer.0;
        for (s, e) in holes {
            if s > cursor {
                out.push((cursor, s));
            }
            cursor = e;
        }
        if cursor != outer.1 {
            out.push((cursor, outer.1));
        }
        out
    }

    fn allowed(plan: &[Vec<Block>], v4: bool) -> Vec<(u128, u128)> {
        let mut all = Vec::new();
        for block in plan.iter().flatten() {
            if matches!(block.cidr, IpNet::V4(_)) == v4 {
                let holes: Vec<_> = block.except.iter().map(range).collect();
                all.extend(subtract(range(&block.cidr), &holes));
            }
        }
        normalize(all)
    }

    fn expected(space: IpNet, bans: &[IpNet]) -> Vec<(u128, u128)> {
        let holes: Vec<_> = bans.iter().map(range).collect();
        normalize(subtract(range(&space), &holes))
    }

    fn arb_v4() -> impl Strategy<Value = SourcePrefix> {
        (any::<u32>(), 8u8..=32)
            .prop_map(|(addr, len)| SourcePrefix(IpNet::V4(Ipv4Net::new_assert(addr.into(), len))))
    }

    fn arb_v6() -> impl Strategy<Value = SourcePrefix> {
        (any::<u128>(), 16u8..=128)
            .prop_map(|(addr, len)| SourcePrefix(IpNet::V6(Ipv6Net::new_assert(addr.into(), len))))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The union of every shard's allowed sources is exactly everything except the bans,
        /// each `except` is a strict subset of its `cidr`, blocks are disjoint, and no shard
        /// exceeds the limit.
        #[test]
        fn union_of_shards_is_exactly_allow_all_except_bans(
            sources in prop::collection::vec(prop_oneof![3 => arb_v4(), 1 => arb_v6()], 0..120),
            limit in 1usize..20,
        ) {
            let banned = BannedPrefixes::aggregate(&sources);
            let plan = shard(&banned, limit);
            prop_assert_eq!(allowed(&plan, true), expected(ALL_V4, &banned.v4));
            prop_assert_eq!(allowed(&plan, false), expected(ALL_V6, &banned.v6));
            let blocks: Vec<&Block> = plan.iter().flatten().collect();
            for (i, a) in blocks.iter().enumerate() {
                for e in &a.except {
                    prop_assert!(a.cidr.contains(e) && *e != a.cidr);
                }
                for b in &blocks[i + 1..] {
                    prop_assert!(!a.cidr.contains(&b.cidr) && !b.cidr.contains(&a.cidr));
                }
            }
            for s in &plan {
                prop_assert!(s.iter().map(|b| b.except.len()).sum::<usize>() <= limit);
            }
        }

        /// Every source given is inside some banned prefix, and nothing else is.
        #[test]
        fn aggregation_covers_exactly_the_sources(
            sources in prop::collection::vec(arb_v4(), 1..60),
            probe in any::<u32>(),
        ) {
            let banned = BannedPrefixes::aggregate(&sources);
            let address = IpAddr::from(std::net::Ipv4Addr::from(probe));
            let by_sources = sources.iter().any(|s| s.network().contains(&address));
            prop_assert_eq!(banned.contains(&address), by_sources);
            for s in &sources {
                prop_assert!(banned.contains(&s.network().network()));
            }
        }
    }
}
