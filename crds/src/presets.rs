//! PortSentry's three decoy presets, exactly the port lists of the classic `portsentry.conf`
//! (the active lists and the two commented alternatives "aware" and "bare-bones").

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A PortSentry decoy port-list preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Preset {
    /// The classic lists: the most ports, the ones PortSentry ships active.
    Classic,
    /// "Use these if you just want to be aware": fewer, rarely used ports.
    Aware,
    /// "Use these for just bare-bones": the smallest lists.
    BareBones,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Classic, Preset::Aware, Preset::BareBones];

    /// TCP decoy ports of the preset, in the order the classic config lists them.
    pub const fn tcp(self) -> &'static [u16] {
        match self {
            Preset::Classic => &[
                1, 7, 9, 11, 15, 70, 79, 80, 109, 110, 111, 119, 138, 139, 143, 512, 513, 514, 515,
                540, 635, 1080, 1524, 2000, 2001, 4000, 4001, 5742, 6000, 6001, 6667, 12345, 12346,
                20034, 27665, 30303, 32771, 32772, 32773, 32774, 31337, 40421, 40425, 49724, 54320,
            ],
            Preset::Aware => &[
                1, 11, 15, 79, 111, 119, 143, 540, 635, 1080, 1524, 2000, 5742, 6667, 12345, 12346,
                20034, 27665, 31337, 32771, 32772, 32773, 32774, 40421, 49724, 54320,
            ],
            Preset::BareBones => &[
                1, 11, 15, 110, 111, 143, 540, 635, 1080, 1524, 2000, 12345, 12346, 20034, 32771,
                32772, 32773, 32774, 49724, 54320,
            ],
        }
    }

    /// UDP decoy ports of the preset, in the order the classic config lists them.
    pub const fn udp(self) -> &'static [u16] {
        match self {
            Preset::Classic => &[
                1, 7, 9, 66, 67, 68, 69, 111, 137, 138, 161, 162, 474, 513, 517, 518, 635, 640,
                641, 666, 700, 2049, 31335, 27444, 34555, 32770, 32771, 32772, 32773, 32774, 31337,
                54321,
            ],
            Preset::Aware => &[
                1, 7, 9, 69, 161, 162, 513, 635, 640, 641, 700, 37444, 34555, 31335, 32770, 32771,
                32772, 32773, 32774, 31337, 54321,
            ],
            Preset::BareBones => &[
                1, 7, 9, 69, 161, 162, 513, 640, 700, 32770, 32771, 32772, 32773, 32774, 31337,
                54321,
            ],
        }
    }
}
