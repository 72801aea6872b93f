//! SVG figures with plotters: line charts and grouped bar charts.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One named line.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (x0, x1) = bounds(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (_, y1) = bounds(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), 0.0..y1 * 1.08)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 6, style))
                .map_err(|e| anyhow!("{e}"))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|e| anyhow!("{e}"))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Categories and series for [`grouped_bars`] from rows: categories in order of first
/// appearance, one series per `series` key holding its rows' values in row order.
pub fn bar_groups<'a, T: 'a>(
    rows: impl IntoIterator<Item = &'a T>,
    category: impl Fn(&T) -> String,
    series: impl Fn(&T) -> String,
    value: impl Fn(&T) -> f64,
) -> (Vec<String>, Vec<(String, Vec<f64>)>) {
    let mut categories: Vec<String> = Vec::new();
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for row in rows {
        let cat = category(row);
        if !categories.contains(&cat) {
            categories.push(cat);
        }
        let (name, v) = (series(row), value(row));
        match out.iter_mut().find(|s| s.0 == name) {
            Some(s) => s.1.push(v),
            None => out.push((name, vec![v])),
        }
    }
    (categories, out)
}

/// Bars grouped by category, one bar per series within each group.
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (_, y1) = bounds(series.iter().flat_map(|s| s.1.iter().copied()));
    let groups = categories.len().max(1);
    let per_group = series.len().max(1) + 1;
    let slots = (groups * per_group) as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0..slots, 0.0..y1 * 1.45)
        .map_err(|e| anyhow!("{e}"))?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(slots as usize)
        .x_label_formatter(&move |x: &i32| {
            let g = (*x as usize) / per_group;
            if (*x as usize) % per_group == per_group / 2 && g < cats.len() {
                cats[g].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (name, values)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, &v)| {
                let x = (g * per_group + i) as i32;
                Rectangle::new([(x, 0.0), (x + 1, v)], color.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// A grid of cells coloured by value (white at `low`, dark blue at `high`), each labelled with
/// its value; `x_values` run left to right, `y_values` bottom to top, `cells[y][x]`.
pub struct Heatmap<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_values: &'a [f64],
    pub y_values: &'a [f64],
    pub cells: &'a [Vec<f64>],
    pub low: f64,
    pub high: f64,
}

pub fn heatmap(path: &Path, h: &Heatmap<'_>) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (nx, ny) = (h.x_values.len() as i32, h.y_values.len() as i32);
    let mut chart = ChartBuilder::on(&root)
        .caption(h.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d((0..nx - 1).into_segmented(), (0..ny - 1).into_segmented())
        .map_err(|e| anyhow!("{e}"))?;
    let xs = h.x_values.to_vec();
    let ys = h.y_values.to_vec();
    let label = |values: Vec<f64>| {
        move |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => values
                .get(*i as usize)
                .map_or(String::new(), |v| format!("{v:.2}")),
            _ => String::new(),
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(nx as usize)
        .y_labels(ny as usize)
        .x_label_formatter(&label(xs))
        .y_label_formatter(&label(ys))
        .x_desc(h.x_label)
        .y_desc(h.y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let span = (h.high - h.low).max(1e-9);
    for (y, row) in h.cells.iter().enumerate() {
        for (x, &v) in row.iter().enumerate() {
            let t = ((v - h.low) / span).clamp(0.0, 1.0);
            let shade = |c: f64| (255.0 - t * (255.0 - c)) as u8;
            let fill = RGBColor(shade(31.0), shade(80.0), shade(180.0));
            let (x, y) = (x as i32, y as i32);
            let corner = |x: i32, y: i32| (SegmentValue::Exact(x), SegmentValue::Exact(y));
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [corner(x, y), corner(x + 1, y + 1)],
                    fill.filled(),
                )))
                .map_err(|e| anyhow!("{e}"))?;
            let ink = if t > 0.55 { WHITE } else { BLACK };
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:.2}"),
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    ("sans-serif", 14)
                        .into_font()
                        .color(&ink)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
