//! `lab graph`: an SVG picture of the lab — the internet and router on top, one bar per underlay
//! subnet, nodes with their pods below, VXLAN tunnels as dashed arcs between nodes.

use crate::State;
use cluster::Backend;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn svg(s: &State) -> String {
    const W: usize = 230;
    const GAP: usize = 30;
    let n = s.nodes.len().max(1);
    let width = n * (W + GAP) + GAP;
    let rows = |node: &str| s.pods.iter().filter(|p| p.node == node).count();
    let max_pods = s.nodes.iter().map(|x| rows(&x.name)).max().unwrap_or(0);
    let node_top = 150 + 40 * s.spec.underlay.subnets.len() + 60;
    let node_h = 80 + 18 * max_pods;
    let height = node_top + node_h + 60;
    let mut o = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{GAP}" y="24" font-size="16">lab {} — backend {}, cluster {}</text>
"#,
        esc(&s.spec.name),
        s.spec.backend.as_str(),
        s.spec.cluster_cidr
    );
    let mid = width / 2;
    o += &format!(
        r##"<rect x="{}" y="40" width="200" height="34" rx="6" fill="#eef" stroke="#446"/><text x="{}" y="62">internet 203.0.113.10</text>
"##,
        mid - 100,
        mid - 90
    );
    o += &format!(
        r##"<line x1="{mid}" y1="74" x2="{mid}" y2="96" stroke="#446"/><rect x="{}" y="96" width="200" height="34" rx="6" fill="#efe" stroke="#464"/><text x="{}" y="118">router (no NAT)</text>
"##,
        mid - 100,
        mid - 90
    );
    for (i, sub) in s.spec.underlay.subnets.iter().enumerate() {
        let y = 150 + 40 * i;
        o += &format!(
            r##"<line x1="{mid}" y1="130" x2="{mid}" y2="{y}" stroke="#464"/><rect x="{GAP}" y="{y}" width="{}" height="14" fill="#ddd"/><text x="{}" y="{}">underlay ul{i} {sub}</text>
"##,
            width - 2 * GAP,
            GAP + 6,
            y + 11
        );
    }
    for (i, node) in s.nodes.iter().enumerate() {
        let x = GAP + i * (W + GAP);
        let bar = 150 + 40 * node.subnet + 14;
        o += &format!(
            r##"<line x1="{}" y1="{bar}" x2="{}" y2="{node_top}" stroke="#888"/>
<rect x="{x}" y="{node_top}" width="{W}" height="{node_h}" rx="8" fill="#fafafa" stroke="#333"/>
<text x="{}" y="{}" font-weight="bold">{}</text><text x="{}" y="{}">eth0 {}  pods {}</text><text x="{}" y="{}">cni0 bridge</text>
"##,
            x + W / 2,
            x + W / 2,
            x + 8,
            node_top + 18,
            esc(&node.name),
            x + 8,
            node_top + 36,
            node.ip,
            node.pod_cidr,
            x + 8,
            node_top + 54
        );
        for (j, p) in s.pods.iter().filter(|p| p.node == node.name).enumerate() {
            let ip = p.ip.map(|i| i.to_string()).unwrap_or_default();
            let label = format!("{} {}", ip, p.name);
            o += &format!(
                r##"<text x="{}" y="{}" fill="#225">└ {}</text>
"##,
                x + 14,
                node_top + 74 + 18 * j,
                esc(&label[..label.len().min(30)])
            );
        }
    }
    if s.spec.backend != Backend::HostGw {
        for (i, a) in s.nodes.iter().enumerate() {
            for (j, b) in s.nodes.iter().enumerate().skip(i + 1) {
                if s.spec.backend == Backend::Auto && a.subnet == b.subnet {
                    continue;
                }
                let (xa, xb) = (GAP + i * (W + GAP) + W / 2, GAP + j * (W + GAP) + W / 2);
                let y = node_top + node_h;
                o += &format!(
                    r##"<path d="M {xa} {y} Q {} {} {xb} {y}" fill="none" stroke="#c60" stroke-dasharray="6 4"/>
"##,
                    (xa + xb) / 2,
                    y + 40
                );
            }
        }
        o += &format!(
            r##"<text x="{GAP}" y="{}" fill="#c60">- - VXLAN flatnet.1 (VNI 1, UDP 4789)</text>
"##,
            height - 8
        );
    }
    o += "</svg>\n";
    o
}
