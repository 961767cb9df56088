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

/// The same forged entries arriving by replication (`AppendEntries`) are refused by the
/// follower's check before they reach its log.
#[test]
fn forged_entries_are_refused_when_replicated() {
    let forged: Vec<_> =
        coalesce_fuzz::seeds::peer().into_iter().filter(|(n, _)| n.starts_with("append-forged-")).collect();
    assert!(forged.len() >= 8, "the forged seeds, replicated");
    let mut refused = 0;
    for (name, data) in forged {
        let rpc: openraft::raft::AppendEntriesRequest<coalesce_wire::types::TypeConfig> =
            coalesce_wire::codec::decode_msg("append", &data[1..]).expect("a replicated seed decodes");
        // A forged entry that postcard cannot decode never made it into the request (only the
        // valid one before it did); the others must be refused.
        if rpc.entries.len() > 1 {
            let verdict = coalesce_wire::peer::check_entries(&rpc);
            assert!(verdict.as_ref().is_err_and(|e| e.starts_with("entry 2")), "{name}: {verdict:?}");
            refused += 1;
        }
    }
    // (Most forged seeds are refused by decoding already: bad sketches and registers.)
    assert!(refused >= 3, "{refused} forged entries arrived to be refused");
}

/// Valid events are pre-merged into batches; every event of the refused seed is refused.
#[test]
fn request_seeds_do_what_their_names_say() {
    use coalesce_proto::v1 as pb;
    use prost::Message;
    let seeds = coalesce_fuzz::seeds::request();
    let table = coalesce_fuzz::seeds::table();
    let check = |name: &str| {
        let data = &seeds.iter().find(|(n, _)| n == name).expect("a seed").1;
        let req = pb::IngestRequest::decode(&data[1..]).expect("a request");
        let ok = |_: &coalesce_core::batch::Event, _: usize| Ok(());
        let limits = coalesce_fuzz::request::LIMITS;
        coalesce_wire::api::check_ingest(
            &req,
            0,
            limits,
            &table,
            coalesce_fuzz::request::SHARDS,
            coalesce_fuzz::seeds::NOW,
            ok,
        )
        .expect("within bounds")
    };
    // Every value kind to every stream: each event is accepted into a batch or refused for its
    // operator's type.
    let accepted = check("producer");
    let ok = accepted.statuses.iter().filter(|s| s.code == pb::EventCode::Ok as i32).count();
    assert!(ok >= 20, "{ok} events accepted");
    assert_eq!(accepted.batches.values().map(|b| b.events()).sum::<usize>(), ok);
    assert!(
        accepted
            .statuses
            .iter()
            .all(|s| s.code == pb::EventCode::Ok as i32 || s.reason == "type_mismatch" || s.reason == "invalid_value")
    );
    let refused = check("refused");
    let codes: Vec<_> = refused.statuses.iter().map(|s| s.reason.as_str()).collect();
    assert!(codes.iter().all(|r| !r.is_empty()), "every event of the refused seed is refused: {codes:?}");
}
