"""Target devices: memory, bandwidth, cores, NPU and power, each number with its public source.

A value is None where no public source was found; nothing here is guessed. "derived" marks numbers
computed from sourced facts (e.g. bandwidth = transfer rate × bus width), with the arithmetic in
the note. Sources were gathered 2026-11-25; several are secondary reports, and a confidence is given.
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

DEVICES: tuple[Device, ...] = (
    Device(
        "iPhone 15 Pro", "Apple A17 Pro",
        Sourced(8, "https://appleosophy.com/2023/09/13/iphone-15-pro-now-officially-features-8-gb-ram"),
        Sourced(6, "https://github.com/introlab/rtabmap/pull/1446",
                "about 3 GB by default, about 6 GB with the increased-memory-limit entitlement (developer measurement)",
                "medium"),
        Sourced(51.2, "https://appleinsider.com/articles/23/09/26/iphone-15-pro-first-to-use-new-incredibly-dense",
                "LPDDR5 per teardown; 6400 MT/s × 64-bit = 51.2 GB/s (speed and bus width not confirmed by Apple)",
                "low", derived=True),
        Sourced(2, "https://usbusinessreviews.com/a17-pro-deep-dive-a-look-at-apples-new-iphone-15-pro-chip",
                "2 performance + 4 efficiency cores"),
        Sourced("16-core Neural Engine, 35 TOPS",
                "https://www.phoneworld.com.pk/iphone-16-set-to-revolutionize-ai-with-new-neural-engine/"),
        Sourced(4.13, "https://www.notebookcheck.net/Severe-Apple-iPhone-15-Pro-Max-thermal-throttling-reported-a",
                "30-minute gaming load, measured on the 15 Pro Max (same SoC)", "medium"),
    ),
    Device(
        "iPhone 16 Pro", "Apple A18 Pro",
        Sourced(8, "https://aphnetworks.com/news/29221-apple-exec-confirms-all-iphone-16-models-will-have-8gb-"),
        NONE,
        Sourced(60.0, "https://www.gadgets360.com/mobiles/news/apple-iphone-16-series-a18-pro-chipset-details-653",
                "Apple: 17 % more bandwidth than A17 Pro; 51.2 × 1.17 ≈ 60 GB/s", "low", derived=True),
        Sourced(2, "https://www.phonearena.com/news/a18-18-pro-application-processors-faster-more-energy-effic",
                "2 performance + 4 efficiency cores"),
        Sourced("16-core Neural Engine, 35 TOPS",
                "https://4nownews.com/technology-and-it-market-news/apple-introduced-the-a18-and-a18-pro-pr"),
        NONE,
    ),
    Device(
        "Pixel 8", "Google Tensor G3",
        Sourced(8, "https://www.xda-developers.com/google-pixel-8-series-launched/", "LPDDR5X"),
        NONE,
        NONE,
        Sourced(5, "https://www.androidauthority.com/google-tensor-g3-specs-leak-3369648/",
                "1× Cortex-X3 + 4× Cortex-A715 (+ 4× A510 efficiency)"),
        Sourced("Google TPU (no TOPS published)", "https://techlog360.com/google-pixel-8-tensor-g3-chipset-specifications-leaked/",
                confidence="medium"),
        NONE,
    ),
    Device(
        "Galaxy S24", "Samsung Exynos 2400 (Snapdragon 8 Gen 3 in the US/Canada)",
        Sourced(8, "https://www.notebookcheck.net/Samsung-Galaxy-S24-Performance-and-efficiency-comparisons-re",
                confidence="medium"),
        NONE,
        Sourced(68.3, "https://citylife.capetown/uncategorized/exynos-2400-chip-is-10-core-cpu-monster-with-2x-gr",
                "Exynos 2400: LPDDR5X 8.5 Gbps × 64-bit = 68.3 GB/s", "low", derived=True),
        Sourced(6, "https://trendgrnd.com/qualcomms-snapdragon-8-gen-3-infuses-high-performance-ai-for-upcomin",
                "1× Cortex-X4 + 5× Cortex-A720 (+ efficiency cores) on both SoCs"),
        Sourced("Samsung NPU, 17K MAC (Exynos 2400)",
                "https://citylife.capetown/uncategorized/exynos-2400-chip-is-10-core-cpu-monster-with-2x-gr",
                confidence="medium"),
        NONE,
    ),
    Device(
        "Galaxy A15 5G (6 GB)", "MediaTek Dimensity 6100+",
        Sourced(6, "https://notebookcheck.com/Geruecht-Samsung-Galaxy-A15-5G-erhaelt-Upgrade-auf-Dimensity-610",
                "sold with 4, 6 or 8 GB; the 6 GB model", "medium"),
        NONE,
        NONE,
        Sourced(2, "https://gizchina.it/2023/07/mediatek-dimensity-6100-plus-ufficiale-caratteristiche/",
                "2× Cortex-A76 + 6× Cortex-A55; LPDDR4X-4266, bus width not published"),
        Sourced("none", "https://gizchina.it/2023/07/mediatek-dimensity-6100-plus-ufficiale-caratteristiche/",
                "no NPU listed", "low"),
        NONE,
    ),
    Device(
        "Raspberry Pi 5 (8 GB)", "Broadcom BCM2712",
        Sourced(8, "https://www.raspberrypi.com/documentation/computers/raspberry-pi.html"),
        Sourced(8, "https://www.raspberrypi.com/documentation/computers/raspberry-pi.html",
                "Linux: a process may use all RAM the OS leaves free", "medium"),
        Sourced(17.1, "https://liliputing.com/raspberry-pi-5-offers-2x-the-performance-up-to-2x-the-ram-and-a-1-7",
                "32-bit LPDDR4X-4267 = 17.1 GB/s", derived=True),
        Sourced(4, "https://circuitdigest.com/news/the-new-raspberry-pi-5-is-here-faster-than-ever", "4× Cortex-A76"),
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
        Sourced("16-core Neural Engine, 11 TOPS", "https://clubdeportivomerlo.com/m1-is-the-first-apple-silicon-chip-for-the-mac-30752/"),
        Sourced(10.0, "https://www.anandtech.com/Show/Index/16252",
                "about 10 W reported sustained for the fanless Air (20-24 W peak in the Mac mini)", "medium"),
    ),
)
