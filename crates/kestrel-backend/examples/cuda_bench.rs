//! CUDA microbenchmark: GEMV bandwidth per weight dtype at the default
//! model's shapes (Gemma 3 270M) against the device's copy bandwidth, and a
//! decode-step-shaped sequence of operations, eager and as a CUDA graph.
//!
//! `cargo run --release -p kestrel-backend --example cuda_bench [-- --reference]`

#[cfg(feature = "cuda")]
mod imp {
    use kestrel_backend::cuda::{
        CudaAct, CudaBackend, CudaBatch, CudaKvPool, CudaRope, CudaVector, CudaWeight, KernelSet,
    };
    use kestrel_backend::{
        Activation, AttnParams, Backend, BatchLayout, KvDType, KvSpec, RopeParams, RopeStyle, SeqLayout,
    };
    use kestrel_formats::{quantize_row, DType, TensorView};

    type Res<T> = Result<T, Box<dyn std::error::Error>>;

    /// Deterministic pseudo-random values in [-1, 1) (xorshift; no zeros).
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn weight_bytes(rng: &mut Noise, dtype: DType, rows: usize, cols: usize) -> Res<Vec<u8>> {
        let mut bytes = Vec::with_capacity(dtype.row_bytes(cols).unwrap_or(0) * rows);
        let row = rng.vec(cols);
        for r in 0..rows {
            // Vary rows cheaply: scale a fixed random row by a per-row factor.
            let s = 0.5 + (r % 97) as f32 / 97.0;
            let src: Vec<f32> = row
                .iter()
                .enumerate()
                .map(|(i, v)| v * s + ((i + r) % 7) as f32 * 0.01)
                .collect();
            quantize_row(dtype, &src, &mut bytes)?;
        }
        Ok(bytes)
    }

    fn upload(
        be: &CudaBackend,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Res<CudaWeight> {
        let shape = [rows, cols];
        Ok(be.upload_matrix(&TensorView {
            name,
            dtype,
            shape: &shape,
            data: bytes,
        })?)
    }

    fn weight(
        be: &CudaBackend,
        rng: &mut Noise,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Res<CudaWeight> {
        let bytes = weight_bytes(rng, dtype, rows, cols)?;
        upload(be, name, dtype, rows, cols, &bytes)
    }

    fn vector(be: &CudaBackend, rng: &mut Noise, n: usize) -> Res<CudaVector> {
        let v: Vec<u8> = rng.vec(n).iter().flat_map(|x| x.to_le_bytes()).collect();
        let shape = [n];
        Ok(be.upload_vector(
            &TensorView {
                name: "norm",
                dtype: DType::F32,
                shape: &shape,
                data: &v,
            },
            1.0,
        )?)
    }

    fn act(be: &CudaBackend, rng: &mut Noise, rows: usize, cols: usize) -> Res<CudaAct> {
        let mut a = be.alloc_act(rows, cols)?;
        be.write_act(&mut a, &rng.vec(rows * cols))?;
        Ok(a)
    }

    /// Device time per call of `f` (us): `reps` calls captured into one graph,
    /// the graph replayed `replays` times (launch overhead mostly gone).
    fn time_graph(
        be: &CudaBackend,
        reps: usize,
        mut f: impl FnMut() -> kestrel_backend::Result<()>,
    ) -> Res<f64> {
        f()?;
        be.begin_capture()?;
        let mut res = Ok(());
        for _ in 0..reps {
            res = f();
            if res.is_err() {
                break;
            }
        }
        let g = be.end_capture()?;
        res?;
        let replays = 10;
        let ms = be.time_ms(replays, || be.replay(&g))?;
        Ok(ms * 1e3 / reps as f64)
    }

    fn gemv_table(be: &CudaBackend, rng: &mut Noise, copy_gbs: f64) -> Res<()> {
        println!("\nGEMV (rows x cols = out x in), device time per call inside a CUDA graph;");
        println!("weights rotated over >= 256 MB (or 512 copies) so L2 cannot hold them");
        println!(
            "{:<6} {:>14} {:>9} | {:>9} {:>8} {:>6} | {:>9} {:>8}",
            "dtype", "shape", "MB", "T=1 us", "GB/s", "%copy", "T=8 us", "GB/s"
        );
        let cases = [
            (DType::Q8_0, 262_144, 640),
            (DType::Q8_0, 2048, 640),
            (DType::Q5_0, 2048, 640),
            (DType::Q5_0, 1024, 640),
            (DType::Q5_0, 256, 640),
            (DType::Q4_0, 2048, 640),
            (DType::Q4_K, 640, 2048),
            (DType::Q5_K, 640, 2048),
            (DType::Q6_K, 640, 2048),
            (DType::Q4_K, 640, 1024),
            (DType::F16, 2048, 640),
            (DType::BF16, 2048, 640),
            (DType::F32, 2048, 640),
        ];
        for (dtype, rows, cols) in cases {
            let host = weight_bytes(rng, dtype, rows, cols)?;
            let first = upload(be, "w", dtype, rows, cols, &host)?;
            let bytes = first.device_bytes();
            let copies = (256usize << 20).div_ceil(bytes).clamp(1, 4096);
            let mut ws = vec![first];
            for _ in 1..copies {
                ws.push(upload(be, "w", dtype, rows, cols, &host)?);
            }
            let mut line = format!(
                "{:<6} {:>14} {:>9.2} |",
                dtype.name(),
                format!("{rows}x{cols}"),
                bytes as f64 / 1e6
            );
            for t in [1usize, 8] {
                let x = act(be, rng, t, cols)?;
                let mut out = be.alloc_act(t, rows)?;
                let reps = copies.clamp(20, 512);
                let mut i = 0;
                let us = time_graph(be, reps, || {
                    i += 1;
                    be.matmul(&x, &ws[i % ws.len()], &mut out)
                })?;
                let gbs = bytes as f64 / (us * 1e-6) / 1e9;
                if t == 1 {
                    line += &format!(" {:>9.2} {:>8.0} {:>5.0}% |", us, gbs, 100.0 * gbs / copy_gbs);
                } else {
                    line += &format!(" {:>9.2} {:>8.0}", us, gbs);
                }
            }
            println!("{line}");
        }
        Ok(())
    }

    struct Layer {
        wq: CudaWeight,
        wk: CudaWeight,
        wv: CudaWeight,
        wo: CudaWeight,
        wg: CudaWeight,
        wu: CudaWeight,
        wd: CudaWeight,
        n_in: CudaVector,
        n_post_attn: CudaVector,
        n_ffn: CudaVector,
        n_post_ffn: CudaVector,
        qn: CudaVector,
        kn: CudaVector,
    }

    struct Model {
        emb: CudaWeight,
        layers: Vec<Layer>,
        out_norm: CudaVector,
        rope: CudaRope,
        x: CudaAct,
        h: CudaAct,
        q: CudaAct,
        k: CudaAct,
        v: CudaAct,
        att: CudaAct,
        t640: CudaAct,
        g: CudaAct,
        u: CudaAct,
        a: CudaAct,
        logits: CudaAct,
        pool: CudaKvPool,
    }

    const D: usize = 640;
    const FF: usize = 2048;
    const HD: usize = 256;
    const NH: usize = 4;

    fn build(be: &CudaBackend, rng: &mut Noise) -> Res<Model> {
        let mut layers = Vec::new();
        for l in 0..18 {
            let down = if l % 2 == 0 { DType::Q6_K } else { DType::Q4_K };
            layers.push(Layer {
                wq: weight(be, rng, "q", DType::Q5_0, NH * HD, D)?,
                wk: weight(be, rng, "k", DType::Q5_0, HD, D)?,
                wv: weight(be, rng, "v", DType::Q8_0, HD, D)?,
                wo: weight(be, rng, "o", DType::Q4_K, D, NH * HD)?,
                wg: weight(be, rng, "g", DType::Q5_0, FF, D)?,
                wu: weight(be, rng, "u", DType::Q5_0, FF, D)?,
                wd: weight(be, rng, "d", down, D, FF)?,
                n_in: vector(be, rng, D)?,
                n_post_attn: vector(be, rng, D)?,
                n_ffn: vector(be, rng, D)?,
                n_post_ffn: vector(be, rng, D)?,
                qn: vector(be, rng, HD)?,
                kn: vector(be, rng, HD)?,
            });
        }
        let inv: Vec<f32> = (0..HD / 2)
            .map(|i| 1e6f32.powf(-2.0 * i as f32 / HD as f32))
            .collect();
        let spec = KvSpec {
            n_layers: 18,
            num_blocks: 256,
            block_size: 16,
            n_kv_heads: 1,
            head_dim: HD,
            dtype: KvDType::F16,
        };
        Ok(Model {
            emb: weight(be, rng, "emb", DType::Q8_0, 262_144, D)?,
            layers,
            out_norm: vector(be, rng, D)?,
            rope: be.make_rope(&RopeParams {
                style: RopeStyle::Neox,
                inv_freq: inv,
                mscale: 1.0,
            })?,
            x: be.alloc_act(1, D)?,
            h: be.alloc_act(1, D)?,
            q: be.alloc_act(1, NH * HD)?,
            k: be.alloc_act(1, HD)?,
            v: be.alloc_act(1, HD)?,
            att: be.alloc_act(1, NH * HD)?,
            t640: be.alloc_act(1, D)?,
            g: be.alloc_act(1, FF)?,
            u: be.alloc_act(1, FF)?,
            a: be.alloc_act(1, FF)?,
            logits: be.alloc_act(1, 262_144)?,
            pool: be.alloc_kv(&spec)?,
        })
    }

    /// One gemma3-shaped decode step (18 layers, LM head, on-device argmax).
    fn step(be: &CudaBackend, m: &mut Model, b: &CudaBatch) -> kestrel_backend::Result<()> {
        let eps = 1e-6;
        be.embed(&m.emb, b, 25.3, &mut m.x)?;
        be.rms_norm(&m.x, &m.layers[0].n_in, eps, &mut m.h)?;
        for (i, l) in m.layers.iter().enumerate() {
            be.matmul(&m.h, &l.wq, &mut m.q)?;
            be.matmul(&m.h, &l.wk, &mut m.k)?;
            be.matmul(&m.h, &l.wv, &mut m.v)?;
            be.qk_norm_rope(&mut m.q, NH, HD, Some(&l.qn), eps, &m.rope, b)?;
            be.qk_norm_rope(&mut m.k, 1, HD, Some(&l.kn), eps, &m.rope, b)?;
            be.write_kv(&mut m.pool, i, &m.k, &m.v, b)?;
            let p = AttnParams {
                n_heads: NH,
                n_kv_heads: 1,
                head_dim: HD,
                scale: 1.0 / 16.0,
                window: Some(512),
                softcap: None,
            };
            be.attention(&m.q, &m.pool, i, b, &p, &mut m.att)?;
            be.matmul(&m.att, &l.wo, &mut m.t640)?;
            be.rms_norm(&m.t640, &l.n_post_attn, eps, &mut m.h)?;
            be.add_rms_norm(&mut m.x, &m.h, &l.n_ffn, eps, &mut m.t640)?;
            be.matmul(&m.t640, &l.wg, &mut m.g)?;
            be.matmul(&m.t640, &l.wu, &mut m.u)?;
            be.gated_activation(&m.g, &m.u, Activation::GeluTanh, &mut m.a)?;
            be.matmul(&m.a, &l.wd, &mut m.t640)?;
            be.rms_norm(&m.t640, &l.n_post_ffn, eps, &mut m.h)?;
            let next = m.layers.get(i + 1).map(|n| &n.n_in).unwrap_or(&m.out_norm);
            be.add_rms_norm(&mut m.x, &m.h, next, eps, &mut m.t640)?;
            std::mem::swap(&mut m.h, &mut m.t640);
        }
        be.matmul(&m.h, &m.emb, &mut m.logits)?;
        be.launch_argmax(&m.logits)
    }

    /// Device time of each op kind of the step, in graphs of 50 repetitions.
    fn profile_ops(be: &CudaBackend, m: &mut Model, b: &CudaBatch) -> Res<()> {
        let eps = 1e-6;
        let p = AttnParams {
            n_heads: NH,
            n_kv_heads: 1,
            head_dim: HD,
            scale: 1.0 / 16.0,
            window: Some(512),
            softcap: None,
        };
        let l = &m.layers[0];
        let r = 50;
        let mut rows: Vec<(&str, f64, usize)> = Vec::new();
        rows.push((
            "embed",
            time_graph(be, r, || be.embed(&m.emb, b, 25.3, &mut m.x))?,
            1,
        ));
        rows.push((
            "rms_norm 640",
            time_graph(be, r, || be.rms_norm(&m.x, &l.n_in, eps, &mut m.h))?,
            2,
        ));
        rows.push((
            "add_rms_norm 640",
            time_graph(be, r, || {
                be.add_rms_norm(&mut m.x, &m.h, &l.n_ffn, eps, &mut m.t640)
            })?,
            2,
        ));
        rows.push((
            "matmul q Q5_0 1024x640",
            time_graph(be, r, || be.matmul(&m.h, &l.wq, &mut m.q))?,
            1,
        ));
        rows.push((
            "matmul k Q5_0 256x640",
            time_graph(be, r, || be.matmul(&m.h, &l.wk, &mut m.k))?,
            1,
        ));
        rows.push((
            "matmul v Q8_0 256x640",
            time_graph(be, r, || be.matmul(&m.h, &l.wv, &mut m.v))?,
            1,
        ));
        rows.push((
            "qk_norm_rope q",
            time_graph(be, r, || {
                be.qk_norm_rope(&mut m.q, NH, HD, Some(&l.qn), eps, &m.rope, b)
            })?,
            1,
        ));
        rows.push((
            "qk_norm_rope k",
            time_graph(be, r, || {
                be.qk_norm_rope(&mut m.k, 1, HD, Some(&l.kn), eps, &m.rope, b)
            })?,
            1,
        ));
        rows.push((
            "write_kv",
            time_graph(be, r, || be.write_kv(&mut m.pool, 0, &m.k, &m.v, b))?,
            1,
        ));
        for cap in [1usize, 4, 8, 16] {
            be.set_max_attention_splits(cap);
            let us = time_graph(be, r, || be.attention(&m.q, &m.pool, 0, b, &p, &mut m.att))?;
            println!("  (attention ctx 301, at most {cap:>2} splits: {us:.2} us)");
        }
        be.set_max_attention_splits(32);
        rows.push((
            "attention ctx 301",
            time_graph(be, r, || be.attention(&m.q, &m.pool, 0, b, &p, &mut m.att))?,
            1,
        ));
        rows.push((
            "matmul o Q4_K 640x1024",
            time_graph(be, r, || be.matmul(&m.att, &l.wo, &mut m.t640))?,
            1,
        ));
        rows.push((
            "matmul gate Q5_0 2048x640",
            time_graph(be, r, || be.matmul(&m.t640, &l.wg, &mut m.g))?,
            2,
        ));
        rows.push((
            "gated_activation 2048",
            time_graph(be, r, || {
                be.gated_activation(&m.g, &m.u, Activation::GeluTanh, &mut m.a)
            })?,
            1,
        ));
        rows.push((
            "matmul down Q6_K 640x2048",
            time_graph(be, r, || be.matmul(&m.a, &m.layers[0].wd, &mut m.t640))?,
            1,
        ));
        rows.push((
            "matmul down Q4_K 640x2048",
            time_graph(be, r, || be.matmul(&m.a, &m.layers[1].wd, &mut m.t640))?,
            1,
        ));
        let lm = time_graph(be, 5, || be.matmul(&m.h, &m.emb, &mut m.logits))?;
        let am = time_graph(be, r, || be.launch_argmax(&m.logits))?;
        println!(
            "{:<28} {:>9} {:>7} {:>10}",
            "op (per layer)", "us/call", "calls", "us/token"
        );
        let mut total = 0.0;
        for (name, us, n) in &rows {
            // down is split evenly between Q6_K and Q4_K layers
            let per_tok = if name.starts_with("matmul down") {
                us * 9.0
            } else if *name == "embed" {
                *us
            } else {
                us * 18.0 * *n as f64
            };
            total += per_tok;
            println!("{name:<28} {us:>9.2} {n:>7} {per_tok:>10.1}");
        }
        println!("{:<28} {lm:>9.2} {:>7} {lm:>10.1}", "LM head Q8_0 262144x640", 1);
        println!("{:<28} {am:>9.2} {:>7} {am:>10.1}", "argmax 262144", 1);
        total += lm + am;
        println!("{:<28} {:>28.1}", "sum of op device times", total);
        Ok(())
    }

    pub fn main() {
        if let Err(e) = run() {
            eprintln!("cuda_bench: {e}");
            std::process::exit(1);
        }
    }

    fn run() -> Res<()> {
        let ks = if std::env::args().any(|a| a == "--reference") {
            KernelSet::Reference
        } else {
            KernelSet::Fused
        };
        let be = CudaBackend::with_kernels(0, ks)?;
        println!("{}", be.describe());
        let copy = be.copy_bandwidth_gbs(1 << 30, 20)?;
        println!("device-to-device copy: {copy:.0} GB/s (read + write)");
        let mut rng = Noise(0x9E37_79B9_7F4A_7C15);
        if !std::env::args().any(|a| a == "--step-only") {
            gemv_table(&be, &mut rng, copy)?;
        }

        println!("\nDecode step (gemma3-270m shapes, 18 layers, context 301, batch 1)");
        let mut m = build(&be, &mut rng)?;
        let table: Vec<u32> = (0..256).collect();
        be.reserve_batch(8, 4, 256)?;
        let layout = BatchLayout::single(&[1234], 300, &table, 16);
        let b = be.prepare_batch(&layout)?;
        let eager = be.time_ms(50, || step(&be, &mut m, &b))?;
        println!("eager: {:.1} us/token = {:.0} tok/s", eager * 1e3, 1e3 / eager);
        profile_ops(&be, &mut m, &b)?;
        be.begin_capture()?;
        step(&be, &mut m, &b)?;
        let g = be.end_capture()?;
        let graph = be.time_ms(200, || be.replay(&g))?;
        println!("graph: {:.1} us/token = {:.0} tok/s", graph * 1e3, 1e3 / graph);
        // The same graph, replayed at a longer context (metadata rewritten in place).
        let _b = be.prepare_batch(&BatchLayout::single(&[99], 2000, &table, 16))?;
        let long = be.time_ms(200, || be.replay(&g))?;
        println!(
            "graph at context 2001: {:.1} us/token = {:.0} tok/s",
            long * 1e3,
            1e3 / long
        );
        let ids = be.fetch_argmax(1)?;
        println!("argmax id {}", ids[0]);

        // Batched decode: 8 sequences of context 301, one token each, as a graph.
        let nseq = 8;
        resize(&be, &mut m, nseq)?;
        be.reserve_batch(nseq, nseq, 256)?;
        let mut lay = BatchLayout {
            block_size: 16,
            ..Default::default()
        };
        for s in 0..nseq {
            let tbl: Vec<u32> = (s as u32 * 20..s as u32 * 20 + 20).collect();
            lay.tokens.push(100 + s as u32);
            lay.positions.push(300);
            lay.slot_mapping.push(tbl[300 / 16] * 16 + 300 % 16);
            lay.seqs.push(SeqLayout {
                block_table: tbl,
                context_len: 301,
                query_start: s as u32,
                query_len: 1,
            });
        }
        let b8 = be.prepare_batch(&lay)?;
        step(&be, &mut m, &b8)?; // sizes scratch outside the capture
        be.begin_capture()?;
        step(&be, &mut m, &b8)?;
        let g8 = be.end_capture()?;
        let t8 = be.time_ms(100, || be.replay(&g8))?;
        println!(
            "graph, {nseq} sequences: {:.1} us/step = {:.0} tok/s",
            t8 * 1e3,
            nseq as f64 * 1e3 / t8
        );
        Ok(())
    }

    fn resize(be: &CudaBackend, m: &mut Model, n: usize) -> Res<()> {
        m.x = be.alloc_act(n, D)?;
        m.h = be.alloc_act(n, D)?;
        m.q = be.alloc_act(n, NH * HD)?;
        m.k = be.alloc_act(n, HD)?;
        m.v = be.alloc_act(n, HD)?;
        m.att = be.alloc_act(n, NH * HD)?;
        m.t640 = be.alloc_act(n, D)?;
        m.g = be.alloc_act(n, FF)?;
        m.u = be.alloc_act(n, FF)?;
        m.a = be.alloc_act(n, FF)?;
        m.logits = be.alloc_act(n, 262_144)?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn main() {
    imp::main()
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench: kestrel-backend was built without its `cuda` feature");
    std::process::exit(1);
}
