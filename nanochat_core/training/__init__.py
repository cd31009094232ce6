"""What every training stage (base, mid, SFT, RL) shares, so a stage's own file is only its loop.

    loop.py        stop guard (signals, deadline), save cadence, schedules, presets, progress events, bpb
    stage_run.py   StageRun: a training stage's set-up and tear-down (runtime, resume, save, finish)
    chat_loop.py   the mid-training / SFT loop over packed conversations
    preflight.py   every device path training uses, exercised in a minute before money is spent; one verdict
"""
