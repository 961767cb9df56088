//! Replays the committed corpus (`fuzz/corpus/<target>/*`) and the hand-made seeds through the
//! targets on the stable toolchain, without libFuzzer: every input that once crashed a target
//! and was fixed stays here as a regression test, and `cargo test` checks the seeds still do
//! what their names say.

use std::path::Path;

#[test]
fn every_corpus_input_runs_clean() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut ran = 0;
    for (target, run) in coalesce_fuzz::TARGETS {
        let Ok(dir) = std::fs::read_dir(corpus.join(target)) else { continue };
        for entry in dir {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).expect("a corpus file");
            eprintln!("{target}: {}", path.display());
            run(&data);
            ran += 1;
        }
    }
    assert!(ran > 0, "the corpus is empty");
}

#[test]
fn seeds_run_clean() {
    for (target, seeds) in coalesce_fuzz::seeds::all() {
        let run = coalesce_fuzz::TARGETS.iter().find(|(t, _)| *t == target).expect("a target").1;
        for (name, data) in seeds {
            eprintln!("{target}: seed {name}");
            run(&data);
        }
    }
}

/// The November crash class, and what the targets found since, is refused before apply: in each
/// forged seed a valid entry applies, then the forged one fails validation or decoding.
#[test]
fn forged_entries_are_refused() {
    use coalesce_fuzz::entry::Command;
    let forged: Vec<_> = coalesce_fuzz::seeds::apply().into_iter().filter(|(n, _)| n.starts_with("forged-")).collect();
    assert!(forged.len() >= 8, "the forged seeds");
    for (name, data) in forged {
        let mut rest = &data[..];
        let mut verdicts = Vec::new();
        while !rest.is_empty() {
            match postcard::take_from_bytes::<Command>(rest) {
                Ok((cmd, tail)) => {
                    verdicts.push(cmd.validate().map_err(|e| e.field));
                    rest = tail;
                }
                Err(e) => {
                    verdicts.push(Err(format!("undecodable: {e}")));
                    break;
                }
            }
        }
        assert!(verdicts[0].is_ok(), "{name}: the valid entry first: {verdicts:?}");
        assert!(verdicts[1].is_err(), "{name}: then the forged one is refused: {verdicts:?}");
    }
}
