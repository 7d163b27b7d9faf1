"""Target devices: memory, bandwidth, cores, NPU and power, each number with its public source.

A value is None where no public source was found; nothing here is guessed. "derived" marks numbers
computed from sourced facts (e.g. bandwidth = transfer rate × bus width), with the arithmetic in
the note. Sources were gathered 2026-11-25; several are secondary reports, and a confidence is given.

app_memory_gb is a number where a measurement exists (iOS: os_proc_available_memory with the
increased-memory-limit entitlement). Android publishes no per-app cap for native memory, so the
Android profiles carry that documented fact as a string, and devices.fit budgets them against total
RAM. sustained_power_w comes from third-party measurements (gaming or GPU-benchmark load, named in
each note); GPU-benchmark figures are short peak loads and overstate what a phone sustains for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sourced:
    value: float | int | str | None
    source: str | None
    note: str = ""
    confidence: str = "high"
    derived: bool = False


@dataclass(frozen=True)
class Device:
    name: str
    soc: str
    ram_gb: Sourced
    app_memory_gb: Sourced  # what one app may use; None where no source gives a number
    bandwidth_gb_s: Sourced  # peak DRAM bandwidth
    performance_cores: Sourced
    npu: Sourced
    sustained_power_w: Sourced  # package/SoC power under sustained load


NONE = Sourced(None, None, "no public source found", "none")

# What Android documents about one app's memory: a fact, not a number; devices.fit budgets such devices on total RAM.
ANDROID_APP_MEMORY = Sourced(
    "no fixed per-app limit published", "https://source.android.com/docs/core/perf/memory-limiter",
    "Android caps only the Java heap (getMemoryClass); native memory is bounded by free system RAM, and lmkd kills "
    "processes by priority under pressure. Android 17+ adds the Memory Limiter, a per-app soft limit (cgroup "
    "memory.high, looser for visible apps) set per device in /system/etc/memory-limiter-config.xml; the values for "
    "this device are not published", "medium")

DEVICES: tuple[Device, ...] = (
    Device(
        "iPhone 15 Pro", "Apple A17 Pro",
        Sourced(8, "https://appleosophy.com/2023/09/13/iphone-15-pro-now-officially-features-8-gb-ram"),
        Sourced(6, "https://github.com/introlab/rtabmap/pull/1446",
                "about 3 GB by default, about 6 GB with the increased-memory-limit entitlement (developer measurement)",
                "medium"),
        Sourced(51.2, "https://appleinsider.com/articles/23/09/26/iphone-15-pro-first-to-use-new-incredibly-dense-micron-memory-chips",
                "LPDDR5 per teardown; 6400 MT/s × 64-bit = 51.2 GB/s (speed and bus width not confirmed by Apple)",
                "low", derived=True),
        Sourced(2, "https://www.tomshw.it/smartphone/il-nuovo-iphone-15-pro-va-quasi-come-un-intel-core-i9-13900k/",
                "2 performance + 4 efficiency cores", "medium"),
        Sourced("16-core Neural Engine, 35 TOPS", "https://github.com/hollance/neural-engine",
                "docs/supported-devices.md: A17 Pro, up to 35 trillion operations per second (Apple's figure)",
                "medium"),
        Sourced(4.13, "https://www.notebookcheck.net/Severe-Apple-iPhone-15-Pro-Max-thermal-throttling-reported-as-A17-Pro-appears-to-push-surface-temperatures-to-48-C-during-gaming.753143.0.html",
                "30-minute gaming load, measured on the 15 Pro Max (same SoC)", "medium"),
    ),
    Device(
        "iPhone 16 Pro", "Apple A18 Pro",
        Sourced(8, "https://aphnetworks.com/news/29221-apple-exec-confirms-all-iphone-16-models-will-have-8gb-ram"),
        NONE,
        Sourced(60.0, "https://www.gadgets360.com/mobiles/news/apple-iphone-16-series-a18-pro-chipset-details-6530448",
                "Apple: 17 % more bandwidth than A17 Pro; 51.2 × 1.17 ≈ 60 GB/s", "low", derived=True),
        Sourced(2, "https://www.phonearena.com/news/a18-18-pro-application-processors-faster-more-energy-efficient_id162371",
                "2 performance + 4 efficiency cores"),
        Sourced("16-core Neural Engine, 35 TOPS",
                "https://4nownews.com/technology-and-it-market-news/apple-introduced-the-a18-and-a18-pro-processors-up-to-30-faster-than-their-predecessors",
                confidence="medium"),
        Sourced(6.3, "https://www.notebookcheck.net/Apple-iPhone-16-Pro-Max-outshines-Galaxy-S25-Ultra-in-gaming-efficiency-and-thermals-with-Wuthering-Waves-and-Genshin-Impact.957565.0.html",
                "device power playing Genshin Impact at 95 fps (Dame Tech), measured on the 16 Pro Max (same SoC, "
                "larger body); Wuthering Waves at 59 fps drew 5.4 W", "medium"),
    ),
    Device(
        "Pixel 8", "Google Tensor G3",
        Sourced(8, "https://www.xda-developers.com/google-pixel-8-series-launched/", "LPDDR5X"),
        ANDROID_APP_MEMORY,
        NONE,
        Sourced(5, "https://androidauthority.com/google-tensor-g3-performance-per-watt-3432137",
                "1× Cortex-X3 2.91 GHz + 4× Cortex-A715 2.37 GHz (+ 4× A510 efficiency), measured on a rooted Pixel 8",
                "medium"),
        Sourced("Google TPU (no TOPS published)", "https://www.xda-developers.com/google-pixel-8-pro-performance-evaluation/",
                "Tensor G3 block list: 1× Tensor Processing Unit", "medium"),
        Sourced(4.7, "https://notebookcheck.com/Google-Pixel-8-Pro-mit-Tensor-G3-unterliegt-Snapdragon-8-Gen-1-in-GPU-Test-verbraucht-aber-viel-weniger-Strom.758718.0.html",
                "GPU-benchmark load (GFXBench Aztec Ruins 1440p offscreen, Golden Reviewer) on the Pixel 8 Pro, same "
                "Tensor G3; GFXBench 3.1 1080p drew 6.9 W", "medium"),
    ),
    Device(
        "Galaxy S24", "Samsung Exynos 2400 (Snapdragon 8 Gen 3 in the US/Canada)",
        Sourced(8, "https://tecnologia.ig.com.br/parceiros/canaltech/2024-02-28/o-galaxy-s24-com-exynos-2400-tem-bom-desempenho-para-jogos-.html",
                "8 GB LPDDR5X (Canaltech spec sheet of the Exynos model)", "medium"),
        ANDROID_APP_MEMORY,
        Sourced(68.3, "https://citylife.capetown/uncategorized/exynos-2400-chip-is-10-core-cpu-monster-with-2x-graphics-power/352050/",
                "Exynos 2400: LPDDR5X 8.5 Gbps (pre-launch report) × 64-bit = 68.3 GB/s; the 64-bit bus width is "
                "not stated in the source", "low", derived=True),
        Sourced(6, "https://sammobile.com/news/exynos-2400-10-core-cpu-amd-rdna3-xclipse-940-gpu-specs-detailed",
                "Exynos 2400: 1× Cortex-X4 + 2× A720 2.9 GHz + 3× A720 2.6 GHz (+ 4× A520 efficiency)", "medium"),
        Sourced("Samsung NPU, 17K MAC (2-GNPU + 2-SNPU, Exynos 2400)",
                "https://www.cellulare-magazine.it/exynos-2400-le-specifiche-del-processore-dei-galaxy-s24-e-s24/",
                confidence="medium"),
        Sourced(10.1, "https://www.notebookcheck.net/Samsung-Galaxy-S24-Performance-and-efficiency-comparisons-result-in-clear-defeat-for-the-Exynos-2400.797220.0.html",
                "GPU-benchmark load (3DMark Wild Life Extreme, Golden Reviewer) on the Exynos 2400; GFXBench Aztec drew "
                "11.4 W and the CPU peaked at 23 W in Geekbench 6", "medium"),
    ),
    Device(
        "Galaxy A15 5G (6 GB)", "MediaTek Dimensity 6100+",
        Sourced(6, "https://notebookcheck.com/Geruecht-Samsung-Galaxy-A15-5G-erhaelt-Upgrade-auf-Dimensity-6100-und-25W-Schnellladung.763864.0.html",
                "sold with 4, 6 or 8 GB; the 6 GB model", "medium"),
        ANDROID_APP_MEMORY,
        Sourced(17.07, "https://siliconcat.net/soc/compare/qualcomm-snapdragon-6-gen-1-vs-mediatek-dimensity-6100-plus",
                "spec aggregator: LPDDR4X 2133 MHz (4266 MT/s) × 2×16-bit = 17.07 GB/s; MediaTek publishes the memory "
                "type and speed but not the bus width", "low"),
        Sourced(2, "https://notebookcheck.com/Samsung-Galaxy-A15-5G-leakt-mit-Dimensity-6100-bei-Geekbench.767639.0.html",
                "2× Cortex-A76 2.2 GHz + 6× Cortex-A55 2.0 GHz (Geekbench listing of SM-A156B)", "medium"),
        Sourced("none", "https://gizchina.it/2023/07/mediatek-dimensity-6100-plus-ufficiale-caratteristiche/",
                "no NPU listed", "low"),
        NONE,
    ),
    Device(
        "Raspberry Pi 5 (8 GB)", "Broadcom BCM2712",
        Sourced(8, "https://www.raspberrypi.com/documentation/computers/raspberry-pi.html"),
        Sourced(8, "https://www.raspberrypi.com/documentation/computers/raspberry-pi.html",
                "Linux: a process may use all RAM the OS leaves free", "medium"),
        Sourced(17.1, "https://liliputing.com/raspberry-pi-5-offers-2x-the-performance-up-to-2x-the-ram-and-a-1-7x-price-hike-starts-at-60/",
                "32-bit LPDDR4X-4267: 4267 MT/s × 4 bytes = 17.1 GB/s", "medium", derived=True),
        Sourced(4, "https://liliputing.com/raspberry-pi-5-offers-2x-the-performance-up-to-2x-the-ram-and-a-1-7x-price-hike-starts-at-60/",
                "4× Cortex-A76 2.4 GHz (Broadcom BCM2712)", "medium"),
        Sourced("none on board (optional 13 TOPS AI Kit)", "https://www.raspberrypi.com/products/ai-kit/"),
        Sourced(11.0, "https://www.raspberrypi.com/documentation/computers/raspberry-pi.html#power-supply",
                "about 11 W measured at full CPU load (27 W official supply)", "medium"),
    ),
    Device(
        "MacBook Air M1 (8 GB)", "Apple M1",
        Sourced(8, "https://www.anandtech.com/Show/Index/16252"),
        NONE,
        Sourced(68.25, "https://www.macrumors.com/2020/11/11/apple-fastest-cpu-core-m1-extremely-plausible/",
                "128-bit LPDDR4X-4266 = 68.25 GB/s", derived=True),
        Sourced(4, "https://www.anandtech.com/Show/Index/16252", "4 performance + 4 efficiency cores"),
        Sourced("16-core Neural Engine, 11 TOPS", "https://github.com/hollance/neural-engine",
                "docs/supported-devices.md: M1, up to 11 trillion operations per second (Apple's figure)", "medium"),
        Sourced(10.0, "https://www.anandtech.com/Show/Index/16252",
                "about 10 W reported sustained for the fanless Air (20-24 W peak in the Mac mini)", "medium"),
    ),
)


PROFILE_FIELDS = ("ram_gb", "app_memory_gb", "bandwidth_gb_s", "performance_cores", "npu", "sustained_power_w")


def describe_devices() -> str:
    """Every profile with its numbers and sources (`qwen-edge devices list`)."""
    lines = []
    for d in DEVICES:
        lines.append(f"{d.name} ({d.soc})")
        for name in PROFILE_FIELDS:
            v = getattr(d, name)
            shown = "unknown" if v.value is None else v.value
            extra = f" [{v.note}]" if v.note else ""
            lines.append(f"  {name}: {shown}{extra} — {v.source or 'no source'} ({v.confidence}"
                         f"{', derived' if v.derived else ''})")
    return "\n".join(lines)
