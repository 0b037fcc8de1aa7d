# streamvln-pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DASHSCOPE := dashscope==2.0.2
TOKENIZER := build/qwen2_tokenizer
DEMO := data/demo
SIM := data/sim
# Demo navigation data comes from the simulator: 224x168 frames keep the reference's 4:3 view and
# hfov (the shards resize to the tiny model's 112x112 anyway) at a quarter of 640x480's render cost.
SIM_TRAJ := --width 224 --height 168 --workers 2
NAV_EVAL := --episodes $(SIM)/episodes/val_unseen.json.gz --every 6 --num-envs 4 --width 224 --height 168
SRCS := --src $(SIM)/trajectory_data/SimR2R
VAL_SRCS := --src $(SIM)/val_unseen/SimR2R
# The co-training demo shards: 112x112 frames (the tiny model's input), at most 8 frames a sample.
COTRAIN := --tokenizer $(TOKENIZER) --out shards --image-size 112 --samples-per-shard 32 --quiet
WORDS := --words red,green,blue,yellow,white,black,left,right,circle,square,triangle
# DAgger in the demo: the stage-1 model drives on every 6th training episode (80 of 480) and the expert
# takes over when it goes wrong (the reference's rules and save criterion, configs/dagger/reference.yaml).
DAGGER := data/dagger_data/SimR2R
DAGGER_RUN := --episodes $(SIM)/episodes/train.json.gz --gt-annotations $(SIM)/trajectory_data/SimR2R/annotations.json \
	--config configs/dagger/reference.yaml --every 6 --num-envs 4 --width 224 --height 168
FIRST_KEY = $$($(PY) -c "import pyarrow.parquet as pq; print(pq.read_table('shards/$(1)/index.parquet').column('key')[0])")

.PHONY: help install install-libero tokenizer demo-data sim-data ladder-data ladder-shards ladder-grounding shards dagger demo demo-cotrain demo-dagger demo-rl demo-manip demo-manip-ladder demo-libero test test-libero bench gpu-check gpu-wheels clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## .venv with the package (editable) and test tools; idempotent

$(VENV)/.installed: setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install-libero: $(VENV)/.libero  ## the optional LIBERO extra (robosuite 1.4, MuJoCo, assets: ~2 GB) into .venv

$(VENV)/.libero: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,libero]'
	touch $@

# Qwen2's BPE ranks ship inside the dashscope wheel; only that one file is taken from it.
build/qwen.tiktoken: | $(VENV)/.installed
	mkdir -p build/wheels
	$(PY) -m pip download -q --no-deps $(DASHSCOPE) -d build/wheels
	$(PY) -c "import glob, zipfile; zipfile.ZipFile(sorted(glob.glob('build/wheels/dashscope-*.whl'))[-1]).extract('dashscope/resources/qwen.tiktoken', 'build/wheels')"
	mv build/wheels/dashscope/resources/qwen.tiktoken $@

$(TOKENIZER)/tokenizer.json: build/qwen.tiktoken
	$(BIN)/streamvln-shards tokenizer --tiktoken $< --out $(TOKENIZER)

tokenizer: $(TOKENIZER)/tokenizer.json  ## build the Qwen2 tokenizer locally into build/qwen2_tokenizer

# mmc4/val.jsonl is the last file synth writes
$(DEMO)/mmc4/val.jsonl: | $(VENV)/.installed
	$(BIN)/streamvln-shards synth --out $(DEMO) --no-nav

demo-data: $(DEMO)/mmc4/val.jsonl  ## write the synthetic co-training sources (videos, scenes, documents) into data/demo

$(SIM)/episodes/train.json.gz: | $(VENV)/.installed
	$(BIN)/streamvln-sim episodes --out $(SIM)/episodes --split train --scenes 40 --per-scene 4 --seed 0

$(SIM)/episodes/val_unseen.json.gz: | $(VENV)/.installed
	$(BIN)/streamvln-sim episodes --out $(SIM)/episodes --split val_unseen --scenes 10 --per-scene 2 --seed 1

$(SIM)/trajectory_data/SimR2R/annotations.json: $(SIM)/episodes/train.json.gz
	$(BIN)/streamvln-sim trajectories --episodes $< --out $(SIM)/trajectory_data/SimR2R $(SIM_TRAJ)

$(SIM)/val_unseen/SimR2R/annotations.json: $(SIM)/episodes/val_unseen.json.gz
	$(BIN)/streamvln-sim trajectories --episodes $< --out $(SIM)/val_unseen/SimR2R $(SIM_TRAJ)

sim-data: $(SIM)/trajectory_data/SimR2R/annotations.json $(SIM)/val_unseen/SimR2R/annotations.json  ## simulator episodes (train, val_unseen) and expert trajectories into data/sim

shards: tokenizer demo-data sim-data  ## write shards/{nav,videoqa,scanqa,mmc4} (train and val splits) from the demo data
	$(BIN)/streamvln-shards nav $(SRCS) --tokenizer $(TOKENIZER) --out shards --config configs/shards/demo.yaml --quiet
	$(BIN)/streamvln-shards nav $(VAL_SRCS) --tokenizer $(TOKENIZER) --out shards --config configs/shards/demo.yaml --split val --quiet
	$(BIN)/streamvln-shards videoqa --data-config $(DEMO)/videoqa/data_config.yaml --video-root $(DEMO)/videoqa/videos \
		--config configs/shards/videoqa.yaml --frames-upbound 8 $(COTRAIN)
	$(BIN)/streamvln-shards videoqa --json $(DEMO)/videoqa/val.json --video-root $(DEMO)/videoqa/videos \
		--config configs/shards/videoqa.yaml --frames-upbound 8 $(COTRAIN) --split val
	$(BIN)/streamvln-shards scanqa --json $(DEMO)/scanqa/scanqa.json --json $(DEMO)/scanqa/sqa3d.json \
		--scene-root $(DEMO)/scanqa/scenes --config configs/shards/scanqa.yaml --frames-upbound 8 $(COTRAIN)
	$(BIN)/streamvln-shards scanqa --json $(DEMO)/scanqa/val.json --scene-root $(DEMO)/scanqa/scenes \
		--config configs/shards/scanqa.yaml --frames-upbound 8 $(COTRAIN) --split val
	$(BIN)/streamvln-shards mmc4 --jsonl $(DEMO)/mmc4/docs.jsonl --image-root $(DEMO)/mmc4/images \
		--config configs/shards/mmc4.yaml $(COTRAIN)
	$(BIN)/streamvln-shards mmc4 --jsonl $(DEMO)/mmc4/val.jsonl --image-root $(DEMO)/mmc4/images \
		--config configs/shards/mmc4.yaml $(COTRAIN) --split val

# The task ladder (docs/simulator.md, "Task tiers"): the demo model trains on the room rung's expert
# trajectories, then drives 100 held-out episodes (val_unseen scenes) of every rung beside the baselines.
LADDER := data/ladder
ROOM_TRAJ := $(LADDER)/room/trajectory_data/SimRoom/annotations.json
ROOM_VAL_TRAJ := $(LADDER)/room/val_unseen_trajectories/SimRoom/annotations.json
# 200 steps: about 4x the expert's longest walks on the room and neighbour rungs, and the episode limit in
# every demo evaluation (recorded in each summary.json); the reference's 500 only lengthens failures.
LADDER_EVAL := --num-envs 4 --width 224 --height 168 --max-steps 200
RUNGS := room neighbour r2r

$(LADDER)/room/train.json.gz: | $(VENV)/.installed
	$(BIN)/streamvln-sim episodes --tier room --out $(LADDER)/room --split train --scenes 300 --per-scene 4 --seed 0

# held out: 100 paths on 50 unseen scenes per rung (r2r gives 3 instructions a path: every 3rd is evaluated)
$(LADDER)/%/val_unseen.json.gz: | $(VENV)/.installed
	$(BIN)/streamvln-sim episodes --tier $* --out $(LADDER)/$* --split val_unseen --scenes 50 --per-scene 2 --seed 1

$(ROOM_TRAJ): $(LADDER)/room/train.json.gz
	$(BIN)/streamvln-sim trajectories --episodes $< --out $(LADDER)/room/trajectory_data/SimRoom $(SIM_TRAJ)

$(ROOM_VAL_TRAJ): $(LADDER)/room/val_unseen.json.gz
	$(BIN)/streamvln-sim trajectories --episodes $< --out $(LADDER)/room/val_unseen_trajectories/SimRoom $(SIM_TRAJ)

ladder-data: $(ROOM_TRAJ) $(ROOM_VAL_TRAJ) $(foreach r,$(RUNGS),$(LADDER)/$(r)/val_unseen.json.gz)  ## the ladder's episodes and the room rung's expert trajectories into data/ladder

ladder-shards: tokenizer ladder-data  ## shards/ladder/nav: the room rung's expert trajectories (train, and val from unseen scenes)
	$(BIN)/streamvln-shards nav --src $(LADDER)/room/trajectory_data/SimRoom --tokenizer $(TOKENIZER) --out shards/ladder \
		--config configs/shards/demo.yaml --quiet
	$(BIN)/streamvln-shards nav --src $(LADDER)/room/val_unseen_trajectories/SimRoom --tokenizer $(TOKENIZER) \
		--out shards/ladder --config configs/shards/demo.yaml --split val --quiet

# Grounding views of the room rung's training scenes (docs/simulator.md), sharded as shards/ladder/scanqa:
# the co-training source of configs/data/demo_grounded.yaml (an experiment; docs/results.md).
$(LADDER)/room/grounding/grounding.json: $(LADDER)/room/train.json.gz
	$(BIN)/streamvln-sim grounding --episodes $< --out $(LADDER)/room/grounding --config configs/sim/grounding.yaml

ladder-grounding: tokenizer $(LADDER)/room/grounding/grounding.json  ## shards/ladder/scanqa: grounding questions on views of the room rung's training scenes
	$(BIN)/streamvln-shards scanqa --json $(LADDER)/room/grounding/grounding.json --scene-root $(LADDER)/room/grounding \
		--tokenizer $(TOKENIZER) --out shards/ladder --config configs/shards/grounding.yaml --quiet

demo: ladder-shards  ## fresh machine to a model that reaches its goals: sim data, shards, peek, train, evaluate, closed loop on the ladder
	$(BIN)/streamvln-sim inspect --episodes $(LADDER)/room/val_unseen.json.gz
	$(BIN)/streamvln-sim show --episodes $(LADDER)/room/val_unseen.json.gz --episode 3 --walk --out $(LADDER)/room_val_ep3.png
	tools/peek shards/ladder/nav
	tools/peek shards/ladder/nav --verify
	tools/peek shards/ladder/nav --tokenizer $(TOKENIZER) --no-color \
		--sample $$($(PY) -c "import pyarrow.parquet as pq; t = pq.read_table('shards/ladder/nav/index.parquet').to_pylist(); print(next(r['key'] for r in t if r['n_history']))") \
		--sheet shards/peek-example.png
	rm -rf runs/demo
	$(BIN)/streamvln-train --shards configs/data/demo.yaml --config configs/train/demo.yaml --output-dir runs/demo
	$(BIN)/streamvln-eval --checkpoint runs/demo/final --shards configs/data/demo_val.yaml --out runs/demo/eval.json
	@echo "closed loop on held-out scenes (val_unseen) of every rung: the demo model beside the baselines:"
	rm -rf runs/demo/ladder
	for r in $(RUNGS); do case $$r in r2r) every=3;; *) every=1;; esac; \
		$(BIN)/streamvln-nav-eval --checkpoint runs/demo/final --episodes $(LADDER)/$$r/val_unseen.json.gz --every $$every \
			$(LADDER_EVAL) --output runs/demo/ladder/$$r/model --maps || exit 1; \
		for p in expert forward random; do $(BIN)/streamvln-nav-eval --policy $$p --episodes $(LADDER)/$$r/val_unseen.json.gz \
			--every $$every $(LADDER_EVAL) --output runs/demo/ladder/$$r/$$p || exit 1; done; done
	tools/ladder_table runs/demo/ladder

# After make demo: the co-training story on the R2R rung's data. The stage-1 model is evaluated on every
# co-training task's held-out samples, collects DAgger data on R2R training episodes (make dagger), and is
# trained on for stage 2 on the five-task mix (navigation, DAgger, video QA, ScanQA, MMC4).
demo-cotrain: shards  ## after make demo: stage-1 model on the co-training tasks, DAgger, stage 2, evaluate
	@test -d runs/demo/final || { echo "no runs/demo/final: run make demo first"; exit 2; }
	tools/peek shards/videoqa --tokenizer $(TOKENIZER) --no-color --sample $(call FIRST_KEY,videoqa) --sheet shards/peek-videoqa.png
	tools/peek shards/mmc4 --tokenizer $(TOKENIZER) --no-color --sample $(call FIRST_KEY,mmc4) --sheet shards/peek-mmc4.png
	@echo "stage 1 model on every task's held-out samples (before stage 2):"
	$(BIN)/streamvln-eval --checkpoint runs/demo/final --shards configs/data/demo_stage2_val.yaml --out runs/demo/eval_all_tasks.json $(WORDS)
	$(MAKE) --no-print-directory dagger
	rm -rf runs/demo_stage2
	$(BIN)/streamvln-train --shards configs/data/demo_stage2.yaml --config configs/train/demo_stage2.yaml --output-dir runs/demo_stage2
	$(BIN)/streamvln-eval --checkpoint runs/demo_stage2/final --shards configs/data/demo_stage2_val.yaml --out runs/demo_stage2/eval.json $(WORDS)

dagger: sim-data  ## DAgger data with the stage-1 demo model (runs/demo/final) into data/dagger_data, sharded as split dagger
	@test -d runs/demo/final || { echo "no runs/demo/final: run make demo first"; exit 2; }
	$(BIN)/streamvln-dagger --checkpoint runs/demo/final $(DAGGER_RUN) --out $(DAGGER) --overwrite
	$(BIN)/streamvln-shards nav --src $(DAGGER) --tokenizer $(TOKENIZER) --out shards --config configs/shards/demo.yaml \
		--split dagger --overwrite --quiet

# After make demo: DAgger on the room rung, where the stage-1 model's SR is between 0.2 and 0.8. The model drives
# every 3rd room training episode (400) and the expert takes over when it goes wrong (the reference's rules).
# Two labellings of what it collects: the reference's (executed actions, its save rule) and the expert's action
# in each visited state (every episode saved). Each is mixed half and half with the walks and fine-tuned for the
# same steps as the fair control, the walks alone; all four models drive 200 held-out room episodes (100 unseen
# scenes), and `compare` pairs each variant with the control on the same episodes.
ROOM_HELDOUT := $(LADDER)/room200/val_unseen.json.gz
LADDER_DAGGER := $(LADDER)/room/dagger
LADDER_DAGGER_RUN := --episodes $(LADDER)/room/train.json.gz --gt-annotations $(ROOM_TRAJ) \
	--config configs/dagger/reference.yaml --every 3 --num-envs 4 --width 224 --height 168 --quiet
DAGGER_EVAL := --episodes $(ROOM_HELDOUT) $(LADDER_EVAL)
DAGGER_RUNS := demo_dagger demo_dagger_relabel demo_dagger_control

$(ROOM_HELDOUT): | $(VENV)/.installed
	$(BIN)/streamvln-sim episodes --tier room --out $(LADDER)/room200 --split val_unseen --scenes 100 --per-scene 2 --seed 1

demo-dagger: ladder-shards $(ROOM_HELDOUT)  ## after make demo: DAgger's effect on the room rung against a fair control, paired in closed loop
	@test -d runs/demo/final || { echo "no runs/demo/final: run make demo first"; exit 2; }
	$(BIN)/streamvln-dagger --checkpoint runs/demo/final $(LADDER_DAGGER_RUN) --out $(LADDER_DAGGER)/SimRoomDagger --overwrite
	$(BIN)/streamvln-dagger --checkpoint runs/demo/final $(LADDER_DAGGER_RUN) --labels expert --save all \
		--out $(LADDER_DAGGER)/SimRoomRelabel --overwrite
	$(BIN)/streamvln-shards nav --src $(LADDER_DAGGER)/SimRoomDagger --tokenizer $(TOKENIZER) --out shards/ladder \
		--config configs/shards/demo.yaml --split dagger --overwrite --quiet
	$(BIN)/streamvln-shards nav --src $(LADDER_DAGGER)/SimRoomRelabel --tokenizer $(TOKENIZER) --out shards/ladder \
		--config configs/shards/demo.yaml --split dagger_relabel --overwrite --quiet
	rm -rf $(addprefix runs/,$(DAGGER_RUNS)) runs/demo/room200
	$(BIN)/streamvln-train --shards configs/data/ladder_dagger.yaml --config configs/train/ladder_dagger.yaml --output-dir runs/demo_dagger
	$(BIN)/streamvln-train --shards configs/data/ladder_dagger_relabel.yaml --config configs/train/ladder_dagger.yaml \
		--output-dir runs/demo_dagger_relabel
	$(BIN)/streamvln-train --shards configs/data/demo.yaml --config configs/train/ladder_dagger.yaml --output-dir runs/demo_dagger_control
	$(BIN)/streamvln-nav-eval --checkpoint runs/demo/final $(DAGGER_EVAL) --output runs/demo/room200
	for r in $(DAGGER_RUNS); do $(BIN)/streamvln-nav-eval --checkpoint runs/$$r/final $(DAGGER_EVAL) --output runs/$$r/room200 || exit 1; done
	@echo "paired on the 200 held-out room episodes: each DAgger variant - the control (same steps on the walks alone):"
	$(BIN)/streamvln-nav-eval compare runs/demo_dagger_control/room200 runs/demo_dagger/room200
	$(BIN)/streamvln-nav-eval compare runs/demo_dagger_control/room200 runs/demo_dagger_relabel/room200
	$(BIN)/streamvln-nav-eval compare runs/demo/room200 runs/demo_dagger_control/room200

# After make demo: the GRPO + SFT hybrid stage on the room rung (configs/rl/demo.yaml), where the stage-1 model's
# SR is between 0.2 and 0.8: phase1_stop with the stall option (docs/rl.md, "Spinning"), phase2_progress with it,
# and phase1_stop as the guide has it (no stall option), each from the stage-1 model on the room rung's training
# episodes. The fair control continues supervised training from the same model on the same walks for as long
# as the longest RL run took. All drive the 200 held-out room episodes of make demo-dagger; `compare` pairs each
# RL model with the control on the same episodes.
RL_RUN := --checkpoint runs/demo/final --episodes $(LADDER)/room/train.json.gz --config configs/rl/demo.yaml \
	--width 224 --height 168
RL_RUNS := demo_rl demo_rl_progress demo_rl_guide
demo-rl: ladder-shards $(ROOM_HELDOUT)  ## after make demo: the RL stage (both phases, with and without the stall fix) vs the same time of supervised training, paired in closed loop
	@test -d runs/demo/final || { echo "no runs/demo/final: run make demo first"; exit 2; }
	rm -rf $(addprefix runs/,$(RL_RUNS)) runs/demo_rl_control
	$(BIN)/streamvln-rl $(RL_RUN) --output-dir runs/demo_rl
	$(BIN)/streamvln-rl $(RL_RUN) --phase phase2_progress --output-dir runs/demo_rl_progress
	$(BIN)/streamvln-rl $(RL_RUN) --set stall_patience=0 --set stall_penalty=0 --output-dir runs/demo_rl_guide
	$(BIN)/streamvln-train --shards configs/data/demo.yaml --config configs/train/demo_rl_control.yaml \
		--max-steps $$(tools/same_time_steps $(addprefix runs/,$(RL_RUNS)) runs/demo) --output-dir runs/demo_rl_control
	test -f runs/demo/room200/summary.json || $(BIN)/streamvln-nav-eval --checkpoint runs/demo/final $(DAGGER_EVAL) \
		--output runs/demo/room200
	for r in $(RL_RUNS) demo_rl_control; do $(BIN)/streamvln-nav-eval --checkpoint runs/$$r/final $(DAGGER_EVAL) \
		--output runs/$$r/room200 || exit 1; done
	@echo "paired on the 200 held-out room episodes: each RL model - the control (supervised, the same time or more):"
	for r in $(RL_RUNS); do $(BIN)/streamvln-nav-eval compare runs/demo_rl_control/room200 runs/$$r/room200 || exit 1; done
	$(BIN)/streamvln-nav-eval compare runs/demo/room200 runs/demo_rl_control/room200
	tools/paired_table runs/demo_rl_control/room200="control: supervised, same time" runs/demo/room200="stage 1 (before)" \
		runs/demo_rl/room200="RL phase1_stop + stall" runs/demo_rl_progress/room200="RL phase2_progress + stall" \
		runs/demo_rl_guide/room200="RL phase1_stop (the guide's)"
	@for r in $(RL_RUNS); do $(PY) -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; k=max(1,len(rows)//5); \
		f=lambda rs,m: sum(r[m] for r in rs)/len(rs); \
		print(f'{sys.argv[2]}: training rollouts, first and last fifth of the updates:'); \
		[print(f'  {n:<6} SR {f(rs,\"sr\"):.3f}  SPL {f(rs,\"spl\"):.3f}  oracle rate {f(rs,\"oracle_rate\"):.3f}  interventions/rollout {f(rs,\"intervention_rate\"):.2f}  return {f(rs,\"return\"):+.2f}  length {f(rs,\"episode_length\"):.1f}') for n,rs in (('first',rows[:k]),('last',rows[-k:]))]" \
		runs/$$r/metrics.jsonl $$r || exit 1; done

# A CALVIN-format folder's training and validation splits to shards: $(call calvin_shards,DATA,OUT,SHARD_CONFIG)
define calvin_shards
	$(BIN)/streamvln-shards calvin --src $(1)/training --tokenizer $(TOKENIZER) --out $(2) \
		--config configs/shards/$(3).yaml --quiet
	$(BIN)/streamvln-shards calvin --src $(1)/validation --tokenizer $(TOKENIZER) --out $(2) \
		--config configs/shards/$(3).yaml --split val --quiet
endef
# A VLA trained with configs/train/TRAIN.yaml on configs/data/MIX.yaml, evaluated offline (MIX_val.yaml) and in
# closed loop beside the scripted expert and the zero action: $(call vla_run,RUN_DIR,MIX,TRAIN,EVAL_OPTIONS)
define vla_run
	rm -rf $(1)
	$(BIN)/streamvln-train --shards configs/data/$(2).yaml --config configs/train/$(3).yaml --output-dir $(1)
	$(BIN)/streamvln-eval --checkpoint $(1)/final --shards configs/data/$(2)_val.yaml --out $(1)/offline_eval.json
	$(call closed_loops,$(1)/final,$(1),$(4))
endef
# A VLA checkpoint in closed loop beside the scripted expert and the zero action: $(call closed_loops,CKPT,OUT,OPTIONS)
define closed_loops
	$(BIN)/streamvln-manip eval --checkpoint $(1) $(3) --out $(2)/closed_loop
	$(BIN)/streamvln-manip eval --policy expert $(3) --out $(2)/closed_loop_expert
	$(BIN)/streamvln-manip eval --policy zero $(3) --out $(2)/closed_loop_zero
endef

# Manipulation (RoboVLMs-style VLA) on the ladder's bottom rung (one red block at a random place: lift it):
# the scripted expert's demonstrations with DART-style noise on its approaches (docs/manip.md), one-step CALVIN
# shards, the demo VLA (configs/model/demo_vla.yaml), offline evaluation on held-out windows, then closed loop
# on 50 held-out initial states beside the scripted expert (upper bound) and the zero action (baseline).
# The policy executes each predicted chunk of 5 whole (--execute chunk; RoboVLMs' default executes the first
# action only): where the expert closes the gripper its last frames before closing look like the first frame
# of the close, so at the block the first action is "open" in most demonstrations and a policy that follows
# it waits there; the chunk's later actions carry the close (docs/manip.md). Independent of make demo.
MANIP := data/manip
MANIP_EVAL := --rung one-block --episodes 50 --max-steps 150 --num-envs 4 --execute chunk
demo-manip: tokenizer  ## manipulation: one-block demos (pybullet) -> CALVIN shards -> the tiny VLA -> offline and closed loop
	$(BIN)/streamvln-manip synth --out $(MANIP) --rung one-block --episodes 300 --val-episodes 20 --action-noise 0.3 \
		--workers 2
	$(call calvin_shards,$(MANIP),shards,calvin_ladder)
	tools/peek shards/manip
	tools/peek shards/manip --verify
	tools/peek shards/manip --tokenizer $(TOKENIZER) --no-color --sample $(call FIRST_KEY,manip) --sheet shards/peek-manip.png
	$(call vla_run,runs/manip,manip_demo,manip_demo,$(MANIP_EVAL))
	tools/manip_table runs/manip

# The ladder's second rung (three blocks; lift the one the instruction names) with demo-manip's recipe unchanged:
# its own demonstrations and shards, the same model and training, closed loop on 17 held-out states per colour;
# then that model on the top rung's 12 tasks (5 held-out states each; it was shown lifts only), for the record.
MANIP_NAMED := data/manip_named
MANIP_NAMED_EVAL := --rung named-block --episodes 17 --max-steps 150 --num-envs 4 --execute chunk
demo-manip-ladder: tokenizer  ## manipulation, the named-block rung: demos -> shards -> the demo VLA -> closed loop
	$(BIN)/streamvln-manip synth --out $(MANIP_NAMED) --rung named-block --episodes 300 --val-episodes 20 \
		--action-noise 0.3 --workers 2
	$(call calvin_shards,$(MANIP_NAMED),shards/named,calvin_ladder)
	tools/peek shards/named/manip --verify
	$(call vla_run,runs/manip_named,manip_named,manip_demo,$(MANIP_NAMED_EVAL))
	rm -rf runs/manip_full
	$(call closed_loops,runs/manip_named/final,runs/manip_full,--rung full --episodes 5 --chains 0 --execute chunk)
	tools/manip_table runs/manip_named runs/manip_full

# LIBERO (optional extra): the scripted expert's demonstrations of libero_object's 10 official tasks (seeded
# placements), shards, the tiny VLA, then closed loop on LIBERO's official initial states and success
# predicates beside the expert and the zero action.
LIBERO := data/libero
LIBERO_EVAL := --sim libero --suite libero_object --episodes 2 --num-envs 4
demo-libero: install-libero tokenizer  ## LIBERO (extra): expert demos -> shards -> tiny VLA -> closed loop on official states
	$(BIN)/streamvln-manip libero-synth --out $(LIBERO) --suite libero_object --episodes 6 --val-episodes 1 --workers 2
	$(call calvin_shards,$(LIBERO),shards/libero,calvin_demo)
	tools/peek shards/libero/manip --verify
	$(call vla_run,runs/libero,libero_demo,libero_demo,$(LIBERO_EVAL))

test: install tokenizer  ## run the test suite (installs what it needs; LIBERO's tests skip without the extra)
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) -m pytest -q --durations=25

test-libero: install-libero tokenizer  ## LIBERO's tests, with the extra installed
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) -m pytest -q tests/test_libero.py

bench: install tokenizer shards ladder-shards  ## benchmarks: print throughput and memory numbers (not tests)
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_shards.py
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_cotrain.py
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_loader.py
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_frame_storage.py
	$(PY) tests/bench/bench_train.py
	$(PY) tests/bench/bench_sim.py
	$(PY) tests/bench/bench_agent.py
	$(PY) tests/bench/bench_dagger.py
	$(PY) tests/bench/bench_rl.py
	$(PY) tests/bench/bench_manip.py
	STREAMVLN_TOKENIZER=$(TOKENIZER) $(PY) tests/bench/bench_serve.py
	$(PY) tests/bench/bench_packing.py

# The one-shot GPU check (docs/gpu.md): on a machine with one GPU, under 8 minutes, one table; without a GPU it
# stops at once and says so. On the device machine there is no .venv: its own python3, with the project installed.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:  ## the one-shot GPU benchmark: trainer, agent and loader at real shapes (tests/bench/bench_gpu.py)
	$(GPU_PY) tests/bench/bench_gpu.py

# What the device machine (Python 3.12, torch 2.11, no package registry; docs/gpu.md) lacks for gpu-check, as
# cp312 wheels in .whl/ (ignored by git; about 46 MB, under the device tool's 64 MiB): the versions tested here.
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 miniworld==2.1.0 gymnasium==1.4.0 pyglet==1.5.31 \
	farama-notifications==0.0.6 cloudpickle==3.1.3
gpu-wheels: | $(VENV)/.installed  ## .whl/: the wheels gpu-check needs on the device machine (docs/gpu.md)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8  # an sdist on PyPI: built here, pure Python
	@du -sh .whl

clean:  ## remove generated data, shards and the demo run (keeps .venv and build/)
	rm -rf $(LADDER) shards/ladder $(DEMO) $(SIM) data/dagger_data data/dagger_data_relabel shards/nav shards/videoqa shards/scanqa shards/mmc4 \
		shards/peek-*.png runs/demo runs/demo_stage2 $(MANIP) shards/manip runs/manip $(MANIP_NAMED) shards/named runs/manip_named runs/manip_full $(LIBERO) shards/libero runs/libero runs/demo_dagger runs/demo_dagger_relabel runs/demo_dagger_control
